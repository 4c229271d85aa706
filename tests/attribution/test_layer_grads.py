"""Per-layer per-sample gradients (attribution.layer_grads) against an autograd loop, one sample at a time.

Every rule and every convolution branch (grouped, 1x1 bmm, swapped roles for few output channels; strides, groups,
dilation, no bias) is exercised, samples own several rows (the m noised copies of the feature recipes), and the
reference sums each sample's rows and differentiates with torch.autograd.grad: an independent computation.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.gradients import GradientEngine
from attribution.layer_grads import LayerGradients, unsupported
from attribution.outputs import NoiseSchedule

B, M = 3, 2  # samples, rows per sample


class Zoo(nn.Module):
    """One of every supported layer and convolution branch; labels feed an Embedding that starts the graph."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 8, 3, padding=1)                                     # grouped
        self.pointwise = nn.Conv2d(8, 12, 1)                                             # 1x1 -> bmm
        self.down = nn.Conv2d(12, 12, 3, stride=2, padding=1, bias=False)                # strided, no bias
        self.dilated = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3)             # groups + dilation
        self.norm = nn.GroupNorm(3, 12)
        self.ln = nn.LayerNorm(12)
        self.proj = nn.Linear(12, 12)                                                    # on 16 tokens: bmm loop
        self.head = nn.Linear(12, 12)                                          # one position: einsum; runs twice
        self.emb = nn.Embedding(5, 12, padding_idx=0)
        self.conv_out = nn.Conv2d(12, 2, 3, padding=1)                                   # O < 8: swapped roles
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, x, labels):
        h = self.down(F.silu(self.pointwise(F.silu(self.conv_in(x)))))
        h = self.norm(self.dilated(h))
        b, c, hh, ww = h.shape
        tokens = (self.proj(self.ln(h.flatten(2).transpose(1, 2))) + self.emb(labels)[:, None, :]
                  + self.head(h.mean((2, 3)))[:, None, :] + self.head(h.amax((2, 3)))[:, None, :])
        h = F.interpolate(tokens.transpose(1, 2).reshape(b, c, hh, ww), scale_factor=2)
        return self.conv_out(h)


@pytest.fixture(scope="module")
def zoo_batch():
    torch.manual_seed(0)
    model = Zoo()
    x = torch.randn(M * B, 2, 8, 8)                      # time-major: sample b owns rows b, B + b
    labels = torch.tensor([0, 3, 4, 2, 3, 0])            # padding_idx 0 appears: its row gets no gradient
    target = torch.randn(M * B, 2, 8, 8)
    return model, x, labels, target


def _loss_rows(model, x, labels, target):
    return ((model(x, labels) - target) ** 2).flatten(1).sum(1)


def _reference(model, x, labels, target, names):
    params = dict(model.named_parameters())
    rows = []
    for b in range(B):
        own = torch.arange(b, M * B, B)
        loss = _loss_rows(model, x[own], labels[own], target[own]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, grads)]))
    return torch.stack(rows)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_every_rule_matches_the_autograd_loop(zoo_batch):
    model, x, labels, target = zoo_batch
    names = [n for n, _ in model.named_parameters()]
    assert unsupported(model, names) == []
    layers = LayerGradients(model, dict(model.named_parameters()))
    blocks = layers.compute(lambda: _loss_rows(model, x, labels, target).sum(), B)
    assert [tuple(b.shape) for b in blocks] == [(B, p.numel()) for p in model.parameters()]
    out = torch.cat(blocks, 1)
    ref = _reference(model, x, labels, target, names)
    assert float(ref.abs().max()) > 0
    _close(out, ref)
    # per parameter too, so that a wrong rule cannot hide behind a large neighbour
    offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
    for i, n in enumerate(names):
        sl = slice(int(offsets[i]), int(offsets[i + 1]))
        if n != "emb.weight":
            assert float(ref[:, sl].abs().max()) > 0, n
        _close(out[:, sl], ref[:, sl])
    emb = out[:, int(offsets[names.index("emb.weight")]):int(offsets[names.index("emb.weight") + 1])].reshape(B, 5, 12)
    assert float(emb[:, 0].abs().max()) == 0 and float(emb[1, 3].abs().max()) > 0 and float(emb[1, 4].abs().max()) == 0

    # out accumulates in place; the same call again is bit-identical (no hidden state, deterministic kernels)
    again = out.clone()
    views = list(again.split(layers.numels, 1))
    assert all(a is b for a, b in zip(layers.compute(lambda: _loss_rows(model, x, labels, target).sum(), B, views),
                                      views))
    torch.testing.assert_close(again, 2 * out)
    assert torch.equal(torch.cat(layers.compute(lambda: _loss_rows(model, x, labels, target).sum(), B), 1), out)


def test_no_activation_outlives_the_call(zoo_batch):
    """Hooks sit on autograd nodes; one that referenced its own node made a cycle through C++ that gc cannot
    collect, which kept the call's output buffer (B x p floats) alive: memory grew with every batch featurized."""
    import gc
    import weakref

    model, x, labels, target = zoo_batch
    layers = LayerGradients(model, dict(model.named_parameters()))
    seen = []
    handle = model.down.register_forward_hook(lambda mod, args, output: seen.append(weakref.ref(output)))
    try:
        blocks = layers.compute(lambda: _loss_rows(model, x, labels, target).sum(), B)
    finally:
        handle.remove()
    seen += [weakref.ref(b) for b in blocks]
    del blocks
    gc.collect()
    assert len(seen) == 1 + len(layers.numels) and all(ref() is None for ref in seen)


def test_a_subset_of_parameters_and_an_unused_layer(zoo_batch):
    """Only the selected parameters are hooked; a layer the loss never reaches gets an exact zero gradient, and
    the model's requires_grad flags and hooks are as before, also when the forward raises."""
    model, x, labels, target = zoo_batch
    names = ["dilated.weight", "norm.bias", "proj.weight", "conv_out.weight"]
    model.proj.weight.requires_grad_(False)  # a frozen flag is restored as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    layers = LayerGradients(model, {n: params[n] for n in names})
    out = torch.cat(layers.compute(lambda: _loss_rows(model, x, labels, target).sum(), B), 1)
    model.proj.weight.requires_grad_(True)
    ref = _reference(model, x, labels, target, names)
    model.proj.weight.requires_grad_(False)
    _close(out, ref)
    # a loss that stops before proj and conv_out: their gradients must be exact zeros, not stale or garbage
    out = torch.cat(layers.compute(lambda: model.norm(model.dilated(model.down(model.pointwise(model.conv_in(x)))))
                                   .sum(), B), 1)
    assert torch.isfinite(out).all()
    n_tail = params["proj.weight"].numel() + params["conv_out.weight"].numel()
    assert float(out[:, -n_tail:].abs().max()) == 0 and float(out[:, :-n_tail].abs().max()) > 0

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        layers.compute(boom, B)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())  # group norms' per-sample forward removed
    model.proj.weight.requires_grad_(True)


def test_unsupported_modules_fall_back_to_vmap_and_say_why():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 1, 3, padding=1)
            self.gain = nn.Parameter(torch.tensor(1.5))  # a bare parameter: no layer rule

        def forward(self, x, t):
            return self.head(F.silu(self.conv(x))) * self.gain

    model = Gain()
    assert unsupported(model, ["conv.weight", "gain"]) == ["gain"]
    with pytest.raises(ValueError, match="gain"):
        LayerGradients(model, dict(model.named_parameters()))
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=100))
    auto = GradientEngine(model, schedule, "loss")
    assert auto.backend == "vmap" and "gain" in auto.backend_reason
    with pytest.raises(ValueError, match="backend 'layers' has no rule for parameters \\['gain'\\]"):
        GradientEngine(model, schedule, "loss", backend="layers")
    only_convs = GradientEngine(model, schedule, "loss", param_filter=lambda n: n.startswith("conv"))
    assert only_convs.backend == "layers"
    with pytest.raises(ValueError, match="backend must be one of"):
        GradientEngine(model, schedule, "loss", backend="fast")

    # a weight shared by two modules is refused too (a hook would see only one use)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert unsupported(tied, [n for n, _ in tied.named_parameters()]) == ["0.weight"]
    # subclasses may change forward (diffusers' LoRACompatibleConv), so only exact types have rules
    class MyConv(nn.Conv2d):
        pass

    assert unsupported(nn.Sequential(MyConv(1, 1, 1)), ["0.weight"]) == ["0.weight"]


def _conditional_unet():
    from attribution.lora import build_conditional_unet

    return build_conditional_unet((8, 16), 1, 4, sample_size=8, channels=1, cross_attention_dim=8, seed=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cross_attention_unet_and_lora_match_the_autograd_loop(lora):
    """UNet2DConditionModel (LayerNorm, GEGLU, cross-attention) and its peft LoRA adapters: both backends agree
    with the loop, and chunking over samples changes nothing but rounding."""
    from diffusers import DDPMScheduler

    from attribution.lora import ClassEncoder, add_lora
    from attribution.outputs import get_output_function

    unet = _conditional_unet()
    if lora:
        add_lora(unet, rank=2, seed=0)
        with torch.no_grad():  # lora_B starts at zero: give every adapter weight a gradient
            for n, p in unet.named_parameters():
                if ".lora_" in n:
                    p.copy_(0.3 * torch.randn_like(p))
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 2, 1, 8, 8, generator=g)
    t = torch.tensor([[5, 700], [300, 999], [0, 450]])
    cond = torch.from_numpy(ClassEncoder(4, 8, seed=0).encode([0, 1, 3]))

    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    params = dict(unet.named_parameters())
    loss = get_output_function("loss")
    rows = []
    for i in range(3):
        total = 0
        for k in range(2):
            xt = schedule.add_noise(x0[i : i + 1], eps[i, k : k + 1], t[i, k : k + 1])
            pred = unet(xt, t[i, k : k + 1], encoder_hidden_states=cond[i : i + 1]).sample
            total = total + loss(pred, eps[i, k : k + 1], t[i, k : k + 1], schedule).sum()
        grads = torch.autograd.grad(total, [params[n] for n in names])
        rows.append(torch.cat([gr.reshape(-1) for gr in grads]) / 2)
    ref = torch.stack(rows)

    for backend, chunk in (("layers", None), ("layers", 2), ("vmap", None)):
        engine = GradientEngine(unet, schedule, "loss", backend=backend, chunk_size=chunk)
        assert engine.param_names == names and engine.backend == backend
        _close(engine.averaged_grads(x0, t, eps, cond), ref)
        assert torch.equal(torch.cat(engine.averaged_grads(x0, t, eps, cond, blocks=True), 1),
                           engine.averaged_grads(x0, t, eps, cond))
    if lora:
        assert all(".lora_" in n for n in names)


def test_a_group_norm_that_starts_the_graph_recomputes_its_statistics():
    """The first layer's output is where the differentiated graph starts (no autograd node): the GroupNorm rule
    then recomputes mean and rstd instead of reading the node's saved ones."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight.add_(torch.randn(4))
        model[0].bias.add_(torch.randn(4))
    x = 3 * torch.randn(M * B, 4, 5, 5) + 1
    names = [n for n, _ in model.named_parameters()]
    layers = LayerGradients(model, dict(model.named_parameters()))
    out = torch.cat(layers.compute(lambda: (model(x) ** 2).sum(), B), 1)
    params = dict(model.named_parameters())
    ref = []
    for b in range(B):
        own = torch.arange(b, M * B, B)
        grads = torch.autograd.grad((model(x[own]) ** 2).sum(), [params[n] for n in names])
        ref.append(torch.cat([g.reshape(-1) for g in grads]))
    _close(out, torch.stack(ref))
