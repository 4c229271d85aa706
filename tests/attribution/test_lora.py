import copy

import numpy as np
import pytest
import torch

from attribution.experiment import TrainingSpec
from attribution.lora import (ClassEncoder, add_lora, build_conditional_unet, encode_images_to_latents,
                              encode_prompts, load_sd_components, lora_layers, lora_parameter_names, lora_state_dict,
                              merge_lora, merged_copy, prune_lora_ranks, train_conditional, unmerge_lora)
from tests.sd_pipeline import write_tiny_sd_pipeline

SPEC = TrainingSpec(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, lr_schedule="constant", ema_decay=None,
                    checkpoints=1, seed=0)


def tiny_unet(seed=0):
    return build_conditional_unet((8, 16), 1, 4, sample_size=8, channels=1, cross_attention_dim=8, seed=seed)


def randomize_lora(unet, seed=1):
    """lora_B starts at zero; give every rank a distinct non-zero magnitude so merging/pruning have effects."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def run(unet, x, t, cond):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def base_weights(unet):
    return {k: v.clone() for k, v in unet.state_dict().items() if ".lora_" not in k}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    cond = torch.from_numpy(ClassEncoder(4, 8, seed=0).encode([0, 1, 3]))
    return x, torch.tensor([10, 400, 900]), cond


def test_only_lora_parameters_get_gradients_and_are_selected(batch):
    from diffusers import DDPMScheduler

    from attribution.gradients import GradientEngine, select_parameters
    from attribution.outputs import NoiseSchedule

    x, t, cond = batch
    unet = tiny_unet()
    n_lora = add_lora(unet, rank=2, seed=0)
    names = lora_parameter_names(unet)
    assert n_lora == sum(p.numel() for n, p in unet.named_parameters() if n in names) > 0
    unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()
    for n, p in unet.named_parameters():
        assert (p.grad is not None) == (n in names), n
    assert any(p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if n in names)

    assert list(select_parameters(unet)) == names
    engine = GradientEngine(unet, NoiseSchedule.from_scheduler(DDPMScheduler()), "loss")
    assert engine.num_params == n_lora
    g = engine.per_sample_grads(x, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), cond)
    assert g.shape == (3, n_lora) and torch.isfinite(g).all() and (g.abs().sum(1) > 0).all()


def test_lora_init_is_seeded_and_leaves_the_output_unchanged(batch):
    x, t, cond = batch
    a, b, c = tiny_unet(), tiny_unet(), tiny_unet()
    before = run(a, x, t, cond)
    state = torch.get_rng_state()
    add_lora(a, 2, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is not consumed
    add_lora(b, 2, seed=3)
    add_lora(c, 2, seed=4)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    torch.testing.assert_close(run(a, x, t, cond), before)  # lora_B = 0 at init
    with pytest.raises(ValueError, match="already carries"):
        add_lora(a, 2)


def test_merge_unmerge_restores_base_weights_and_merged_copy_matches(batch):
    x, t, cond = batch
    unet = tiny_unet()
    add_lora(unet, 4)
    randomize_lora(unet)
    base, out = base_weights(unet), run(unet, x, t, cond)
    merge_lora(unet)
    assert any(not torch.equal(base[k], v) for k, v in base_weights(unet).items())
    torch.testing.assert_close(run(unet, x, t, cond), out, atol=1e-5, rtol=1e-5)
    unmerge_lora(unet)
    for k, v in base_weights(unet).items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)

    plain = merged_copy(unet)
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == set(tiny_unet().state_dict())
    torch.testing.assert_close(run(plain, x, t, cond), out, atol=1e-5, rtol=1e-5)
    assert not any(m.merged for m in lora_layers(unet).values())  # the caller's model stays unmerged


def test_rank_pruning_keeps_top_ranks_exactly_and_stays_trainable(batch):
    from attribution.sampling import ddim_sample, image_seeds

    x, t, cond = batch
    unet = tiny_unet()
    add_lora(unet, 8)
    randomize_lora(unet)
    reference = copy.deepcopy(unet)
    report = prune_lora_ranks(unet, 0.3)
    assert set(report.ranks_before.values()) == {8} and set(report.ranks_after.values()) == {2}  # round(2.4)
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert report.params_after * 4 == report.params_before

    # the pruned model equals the unpruned one with the dropped ranks zeroed: scaling alpha/r_original is kept
    with torch.no_grad():
        for name, m in lora_layers(reference).items():
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            imp = B.norm(dim=0) * A.norm(dim=1)
            drop = torch.argsort(imp, descending=True, stable=True)[2:]
            A[drop] = 0
            torch.testing.assert_close(lora_layers(unet)[name].lora_A["default"].weight,
                                       A[torch.sort(torch.argsort(imp, descending=True, stable=True)[:2]).values])
    torch.testing.assert_close(run(unet, x, t, cond), run(reference, x, t, cond), atol=1e-6, rtol=1e-5)

    r = train_conditional(unet, x.numpy(), cond.numpy(), SPEC)
    assert np.isfinite(r.loss_curve).all()
    assert set(r.checkpoints[0]) == set(lora_parameter_names(unet))  # LoRA-only checkpoints
    s = ddim_sample(r.unet, {"num_train_timesteps": 1000}, image_seeds(0, 3), (1, 8, 8), steps=3,
                    encoder_hidden_states=cond)
    assert s.images.shape == (3, 1, 8, 8) and np.isfinite(s.images).all()


def test_rank_pruning_keeps_at_least_one_rank_and_checks_its_input():
    unet = tiny_unet()
    add_lora(unet, 4)
    assert set(prune_lora_ranks(unet, 0.01).ranks_after.values()) == {1}
    with pytest.raises(ValueError, match="keep_fraction"):
        prune_lora_ranks(unet, 0.0)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        prune_lora_ranks(tiny_unet(), 0.5)


def test_base_pretraining_then_lora_finetuning_with_class_conditioning():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32)
    labels = np.arange(12) % 4
    cond = ClassEncoder(4, 8, seed=0).encode(labels)
    base = train_conditional(tiny_unet(), images, cond, SPEC)
    assert set(base.checkpoints[0]) == set(base.unet.state_dict())  # full model: full checkpoints
    unet = base.unet
    add_lora(unet, 2)
    before_base, before_lora = base_weights(unet), lora_state_dict(unet)
    tuned = train_conditional(unet, images[labels == 1], cond[labels == 1], SPEC)
    assert np.isfinite(tuned.loss_curve).all()
    for k, v in base_weights(tuned.unet).items():
        assert torch.equal(v, before_base[k]), k
    after = lora_state_dict(tuned.unet)
    assert any(not torch.equal(after[k], before_lora[k]) for k in after)
    assert all(torch.equal(v, before_lora[k]) for k, v in lora_state_dict(unet).items())  # caller's copy untouched


def test_class_encoder_is_frozen_orthogonal_and_seeded():
    enc = ClassEncoder(4, 8, tokens=2, seed=0)
    e = enc.encode([0, 1, 2, 3])
    assert e.shape == (4, 2, 8) and e.dtype == np.float32
    flat = e.reshape(4, -1)
    np.testing.assert_allclose(flat @ flat.T, 16 * np.eye(4), atol=1e-4)
    np.testing.assert_array_equal(e, ClassEncoder(4, 8, tokens=2, seed=0).encode([0, 1, 2, 3]))
    assert not any(p.requires_grad for p in enc.parameters())


def test_train_rejects_bad_conditioning():
    from attribution.experiment import ModelSpec
    from attribution.training import train_ddpm

    images = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="one row per training image"):
        train_conditional(tiny_unet(), images, np.zeros((3, 1, 8), np.float32), SPEC)
    with pytest.raises(ValueError, match="one row per training image"):
        train_conditional(tiny_unet(), images, np.zeros((4, 8), np.float32), SPEC)
    with pytest.raises(ValueError, match="cross_attention_dim is 8"):
        train_conditional(tiny_unet(), images, np.zeros((4, 1, 5), np.float32), SPEC)
    with pytest.raises(ValueError, match="is conditional"):
        train_ddpm(images, ModelSpec(), SPEC, init_model=tiny_unet())
    with pytest.raises(ValueError, match="takes no encoder_hidden_states"):
        train_ddpm(images, ModelSpec(block_out_channels=[8, 16], norm_num_groups=4), SPEC,
                   conditioning=np.zeros((4, 1, 8), np.float32))
    frozen = tiny_unet().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train_conditional(frozen, images, np.zeros((4, 1, 8), np.float32), SPEC)


# ---------------------------------------------------------------------------------------------------- Stable Diffusion


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def test_stable_diffusion_directory_trains_one_lora_step_in_latent_space(sd_dir):
    c = load_sd_components(sd_dir)
    assert c.scheduler_config["beta_schedule"] == "scaled_linear"
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 8, 8)).astype(np.float32)
    latents = encode_images_to_latents(c.vae, images)
    assert latents.shape == (2, 4, 4, 4) and latents.dtype == np.float32
    np.testing.assert_array_equal(latents, encode_images_to_latents(c.vae, images))  # mean, not a sample
    prompts = encode_prompts(c.text_encoder, c.tokenizer, ["a cat", "a dog"])
    assert prompts.shape == (2, 8, 8)

    add_lora(c.unet, 2)
    randomize_lora(c.unet)  # non-zero lora_B so that lora_A gets gradients too
    base, lora = base_weights(c.unet), lora_state_dict(c.unet)
    r = train_conditional(c.unet, latents, prompts, SPEC.model_copy(update={"steps": 1}),
                          scheduler_config=c.scheduler_config)
    assert np.isfinite(r.loss_curve).all()
    after = lora_state_dict(r.unet)
    assert all(not torch.equal(after[k], lora[k]) for k in after)
    for k, v in base_weights(r.unet).items():
        assert torch.equal(v, base[k]), k


def test_not_a_pipeline_directory_is_a_clear_error(tmp_path, sd_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sd_components(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_sd_components(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((sd_dir / "model_index.json").read_text())
    (broken / "unet").mkdir()
    with pytest.raises(ValueError, match=r"missing subfolder\(s\) \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        load_sd_components(broken)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode_images_to_latents(load_sd_components(sd_dir).vae, np.full((1, 3, 8, 8), 255, np.float32))
