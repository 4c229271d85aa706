"""Structured channel pruning of the project's UNets (sparsified fine-tuning): real numeric checks on tiny models."""
import copy

import numpy as np
import pytest
import torch

from attribution.experiment import ModelSpec
from attribution.models import build_scheduler, build_unet, count_parameters
from attribution.pruning import PruneReport, load_pruned_state, prune_unet
from storage.models import StoredModel, save_model
from attribution.sampling import ddim_sample, image_seeds

SPECS = {
    "plain": ModelSpec(block_out_channels=[16, 32], norm_num_groups=4),
    "attn": ModelSpec(block_out_channels=[16, 32, 32], norm_num_groups=4, attention=True),
}


def factory(spec, seed=0):
    return lambda: build_unet(spec, sample_size=8, channels=1, seed=seed)


@pytest.fixture(scope="module")
def pruned():
    """name -> (original, pruned copy, report), pruned once per module at ratio 0.3."""
    out = {}
    for name, spec in SPECS.items():
        original = factory(spec)()
        model = copy.deepcopy(original)
        out[name] = (original, model, prune_unet(model, 0.3))
    return out


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([0, 499, 999][:n] + [7] * max(0, n - 3))


@pytest.mark.parametrize("name", SPECS)
def test_parameter_count_drops_and_ratio_is_reported(pruned, name):
    original, model, report = pruned[name]
    assert isinstance(report, PruneReport)
    assert report.params_before == count_parameters(original)
    assert report.params_after == count_parameters(model)
    assert report.params_after < report.params_before
    assert report.requested_ratio == 0.3
    assert report.achieved_param_ratio == pytest.approx(1 - report.params_after / report.params_before, abs=1e-12)
    # channel-group floor rounding + in*out scaling: far more parameters go than the channel ratio
    assert report.achieved_param_ratio > 0.3
    assert report.channels and all(after < before for before, after in report.channels.values())
    assert "conv_out" not in report.channels


@pytest.mark.parametrize("name", SPECS)
def test_pruned_forward_shape_and_finite(pruned, name):
    _, model, _ = pruned[name]
    x, t = batch(5)
    with torch.no_grad():
        y = model(x, t).sample
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", SPECS)
def test_pruned_model_samples_with_ddim(pruned, name):
    _, model, _ = pruned[name]
    s = ddim_sample(model, build_scheduler(SPECS[name]).config, image_seeds(0, 4), (1, 8, 8), steps=5)
    assert s.images.shape == (4, 1, 8, 8)
    assert np.isfinite(s.images).all()
    assert s.images.min() >= -1 and s.images.max() <= 1


@pytest.mark.parametrize("name", SPECS)
def test_groupnorm_divisible_and_conv_out_kept(pruned, name):
    _, model, _ = pruned[name]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms
    for m in norms:
        assert m.num_channels > 0 and m.num_channels % m.num_groups == 0
        assert m.weight.shape == (m.num_channels,)
    assert model.conv_out.out_channels == 1 and model.conv_out.weight.shape[0] == 1
    assert model.conv_out.in_channels == model.conv_norm_out.num_channels < 16


def test_kept_weights_are_a_subset_of_the_original(pruned):
    """Pruning selects channels, it does not change the surviving weights (checked on biases, order kept)."""
    original, model, _ = pruned["plain"]
    for name in ["conv_in", "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2"]:
        before = dict(original.named_modules())[name].bias.detach().numpy()
        after = dict(model.named_modules())[name].bias.detach().numpy()
        assert len(after) < len(before)
        idx = [int(np.flatnonzero(before == v)[0]) for v in after]
        assert idx == sorted(idx)
    assert torch.equal(model.conv_out.bias, original.conv_out.bias)


def test_ratio_zero_leaves_model_unchanged():
    spec = SPECS["plain"]
    a, b = factory(spec)(), factory(spec)()
    report = prune_unet(b, 0.0)
    assert report.params_after == report.params_before and report.achieved_param_ratio == 0.0
    assert report.channels == {}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, t = batch()
    with torch.no_grad():
        assert torch.equal(a(x, t).sample, b(x, t).sample)


def test_any_positive_ratio_removes_at_least_one_channel_per_group():
    """torch-pruning keeps floor(C/G * (1 - r)) channels per norm group: a tiny ratio is not a no-op."""
    model = factory(SPECS["plain"])()
    report = prune_unet(model, 0.01)
    assert report.params_after < report.params_before
    assert all(m.num_channels % m.num_groups == 0 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))


def test_pruning_is_deterministic():
    spec = SPECS["attn"]
    a, b = factory(spec)(), factory(spec)()
    ra, rb = prune_unet(a, 0.3, seed=0), prune_unet(b, 0.3, seed=1)  # seed only feeds the tracing input
    assert ra == rb
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def test_multi_head_attention_pruned_per_head():
    """With 2 heads every head keeps the same number of dims, each taken from its own original head."""
    spec = ModelSpec(block_out_channels=[16, 64], norm_num_groups=4, attention=True)
    original = factory(spec)()
    model = copy.deepcopy(original)
    prune_unet(model, 0.3)
    from diffusers.models.attention_processor import Attention

    pairs = [(a, b) for a, b in zip(original.modules(), model.modules()) if isinstance(a, Attention)]
    assert pairs and all(a.heads == 2 for a, _ in pairs)
    for a, b in pairs:
        full, kept = a.to_q.out_features // 2, b.to_q.out_features // 2
        assert b.to_q.out_features == b.to_k.out_features == b.to_v.out_features == b.inner_dim == 2 * kept
        assert 0 < kept < full
        before, after = a.to_q.bias.detach().numpy(), b.to_q.bias.detach().numpy()
        for head in range(2):
            for v in after[head * kept:(head + 1) * kept]:
                assert int(np.flatnonzero(before == v)[0]) // full == head
    x, t = batch()
    with torch.no_grad():
        assert torch.isfinite(model(x, t).sample).all()


@pytest.mark.parametrize("name", SPECS)
def test_save_load_round_trip(pruned, name, tmp_path):
    _, model, _ = pruned[name]
    digest = save_model(str(tmp_path / "m"), model, build_scheduler(SPECS[name]), pruned=True)
    stored = StoredModel(str(tmp_path / "m"))
    assert stored.digest == digest and stored.marker["pruned"] is True
    loaded = stored.load_unet()
    sm, sl = model.state_dict(), loaded.state_dict()
    assert sm.keys() == sl.keys() and all(torch.equal(sm[k], sl[k]) for k in sm)
    assert count_parameters(loaded) == count_parameters(model) < count_parameters(factory(SPECS[name])())
    x, t = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, loaded(x, t).sample)
    # the reloaded model trains (gradients reach every parameter)
    loaded.train()
    loaded(x, t).sample.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in loaded.parameters())


def test_load_pruned_state_errors(pruned):
    _, model, _ = pruned["plain"]
    with pytest.raises(ValueError, match="does not match the template"):  # template of another architecture
        load_pruned_state(factory(SPECS["attn"])(), model.state_dict())
    # a plain pruned state dict loads into a template too (fine-tuning from an sFT checkpoint)
    template = factory(SPECS["plain"])()
    load_pruned_state(template, model.state_dict())
    assert count_parameters(template) == count_parameters(model)


def test_pruned_model_trains():
    spec = SPECS["attn"]
    model = factory(spec)()
    prune_unet(model, 0.3)
    abar = build_scheduler(spec).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(8, 1, 8, 8, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(15):
        loss = torch.mean((model(xt, t).sample - eps) ** 2)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    after = model.state_dict()
    assert all(after[k].shape == before[k].shape for k in before)
    assert not torch.equal(after["conv_in.weight"], before["conv_in.weight"])


def test_resnet_internal_pooling_samplers_are_fixed_too():
    """ResnetBlock2D(down=True/up=True) use conv-less samplers whose width is the block's input width."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D"), norm_num_groups=4)
    report = prune_unet(model, 0.3)
    assert report.params_after < report.params_before
    x, t = batch()
    with torch.no_grad():
        assert model(x, t).sample.shape == x.shape


def test_bad_inputs():
    with pytest.raises(ValueError):
        prune_unet(factory(SPECS["plain"])(), 1.0)
    with pytest.raises(ValueError):
        prune_unet(factory(SPECS["plain"])(), -0.1)
    with pytest.raises(TypeError):
        prune_unet(torch.nn.Conv2d(1, 4, 3), 0.3)
