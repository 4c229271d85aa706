"""Device placement of the feature path, checked without a GPU: the model goes to PyTorch's ``meta`` device.

A tensor left on the CPU that meets a meta tensor in an op raises, exactly as a CPU tensor meeting a CUDA tensor
does (0-dim CPU scalars are allowed by both), so every op of the gradient engine and the featurizer running on
meta means none of them mixes devices on CUDA either.  This checks placement only: meta tensors hold no values.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from attribution.experiment import MethodSpec, ModelSpec
from attribution.gradients import GradientEngine
from attribution.methods import Featurizer, feature_recipes
from attribution.models import build_scheduler, build_unet
from attribution.outputs import NoiseSchedule
from attribution.timesteps import common_noise_fn, sample_noise_fn, timesteps

META = torch.device("meta")
SPEC = ModelSpec(block_out_channels=[8, 16], norm_num_groups=4, attention=True)


def _meta_unet():
    return build_unet(SPEC, 8, 1, seed=0).to(META), NoiseSchedule.from_scheduler(build_scheduler(SPEC))


def _on_meta(grads, rows: int, widths: list[int]) -> None:
    blocks = grads if isinstance(grads, list) else [grads]
    assert all(b.device == META for b in blocks)
    assert all(b.shape[0] == rows for b in blocks) and sum(b.shape[-1] for b in blocks) == sum(widths)


def test_a_cpu_tensor_meeting_a_meta_tensor_raises():
    """The premise of this file."""
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device=META) + torch.ones(3)


@pytest.mark.parametrize("backend,chunk", [("layers", None), ("layers", 2), ("vmap", None)])
def test_the_gradient_engine_computes_on_the_model_device(backend, chunk):
    unet, schedule = _meta_unet()
    engine = GradientEngine(unet, schedule, "square", backend=backend, chunk_size=chunk)
    assert engine.device == META and engine.backend == backend
    x = torch.zeros(3, 1, 8, 8)  # on the CPU, as the featurizer reads it from numpy
    t_sets = timesteps("uniform", 3, schedule.num_train_timesteps, range(3))
    w = engine.param_numels
    _on_meta(engine.averaged_grads(x, t_sets, common_noise_fn(0, (1, 8, 8)), blocks=True), 3, w)
    _on_meta(engine.averaged_grads(x, t_sets, torch.zeros(3, 3, 1, 8, 8)), 3, w)
    _on_meta(engine.averaged_grads(x, t_sets, sample_noise_fn(0, range(3), (1, 8, 8)), noise_draws=2,
                                   normalize_per_timestep=True), 3, w)
    per_t = engine.query_grads_per_timestep(x, t_sets, common_noise_fn(0, (1, 8, 8)), normalize=True)
    assert per_t.device == META and per_t.shape == (3, 3, engine.num_params)
    _on_meta(engine.per_sample_grads(x, torch.tensor([1, 500, 999]), torch.zeros(3, 1, 8, 8)), 3, w)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_text_conditioned_and_lora_models_compute_on_the_model_device(lora):
    from diffusers import DDPMScheduler

    from attribution.lora import ClassEncoder, add_lora, build_conditional_unet

    unet = build_conditional_unet((8, 16), 1, 4, sample_size=8, channels=1, cross_attention_dim=8, seed=0)
    if lora:
        add_lora(unet, rank=2, seed=0)
    engine = GradientEngine(unet.to(META), NoiseSchedule.from_scheduler(DDPMScheduler()), "loss")
    cond = torch.from_numpy(ClassEncoder(4, 8, seed=0).encode([0, 1, 3]))
    grads = engine.averaged_grads(torch.zeros(3, 1, 8, 8), torch.tensor([[5, 700], [300, 999], [0, 450]]),
                                  common_noise_fn(0, (1, 8, 8)), cond, blocks=True)
    _on_meta(grads, 3, engine.param_numels)


@pytest.mark.parametrize("kind", ["trak", "tracin", "retrac", "journey_trak"])
def test_every_feature_recipe_hands_device_gradients_to_the_projector(kind):
    """Train and query recipes of each method (recorded timesteps with untrained rows, full and per-timestep
    normalization, trajectory timesteps) run on the model's device up to the projection, which fetches them."""
    unet, schedule = _meta_unet()
    seen = []

    def project(grads):
        seen.append(grads)
        return torch.zeros(len(grads[0]), 16)

    for recipe in feature_recipes("m", MethodSpec(kind=kind, K=2), n_checkpoints=1):
        feat = Featurizer(unet, schedule, recipe, projector="countsketch", proj_dim=16, proj_seed=0, noise_seed=0)
        feat.projector.project = project
        t = np.array([40, -1, 900]) if recipe.timesteps in ("recorded", "trajectory") else None
        rows = feat.rows(np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 2]), t)
        assert rows.shape == (3, 16)
        _on_meta(seen.pop(), 3, feat.engine.param_numels)


def test_resolving_cuda_switches_on_deterministic_kernels(monkeypatch):
    from attribution.runtime import resolve_device

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible: set device: cpu or auto"):
        resolve_device("cuda")
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic  # nothing changed on CPU
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert resolve_device("auto") == "cuda"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
