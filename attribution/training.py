"""DDPM training with everything attribution needs recorded: checkpoints, their learning rates, and for every
checkpoint the timestep at which each training sample was last trained (Diffusion-TracIn uses it).

All randomness comes from explicit generators seeded by the training seed, so the same images + spec + seed give
bit-identical weights, and a given seed gives the same initialisation and timestep/noise stream for every subset
(common random numbers across LDS subset models).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .experiment import ModelSpec, TrainingSpec
from .runtime import stable_seed


@dataclass
class TrainingResult:
    unet: object                      # final model (EMA weights when EMA is on), on CPU
    checkpoints: list[dict]           # raw training weights at each checkpoint, CPU tensors
    checkpoint_steps: list[int]
    checkpoint_lrs: list[float]       # mean learning rate over the steps each checkpoint closes: TracIn's weights
    last_timesteps: np.ndarray        # (n_checkpoints, n) int32; -1 = sample not yet trained at that checkpoint
    loss_curve: np.ndarray            # (steps,) float32, mean batch loss per step
    wall_seconds: float
    extra: dict = field(default_factory=dict)


def lr_factor(step: int, spec: TrainingSpec) -> float:
    """Multiplier of the base learning rate at a 0-based step: linear warm-up, then decay to 0 at the last step."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "constant":
        return 1.0
    span = max(spec.steps - spec.warmup_steps, 1)
    progress = min((step - spec.warmup_steps + 1) / span, 1.0)
    if spec.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def checkpoint_steps(spec: TrainingSpec) -> list[int]:
    """Evenly spaced steps (1-based counts of completed steps); the last one is the end of training."""
    steps = sorted({max(1, round(spec.steps * (c + 1) / spec.checkpoints)) for c in range(spec.checkpoints)})
    return steps


def _index_stream(n: int, batch_size: int, generator) -> Callable[[], "object"]:
    """Epoch-wise shuffled indices, consumed batch by batch across epoch boundaries."""
    import torch

    buffer = torch.empty(0, dtype=torch.long)

    def next_batch():
        nonlocal buffer
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        batch, buffer = buffer[:batch_size], buffer[batch_size:]
        return batch

    return next_batch


def train_ddpm(
    images: np.ndarray,
    model_spec: ModelSpec,
    spec: TrainingSpec,
    *,
    seed: int | None = None,
    device: str = "cpu",
    init_model=None,
    conditioning: np.ndarray | None = None,
    scheduler_config: dict | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_every: int = 200,
) -> TrainingResult:
    """Train eps_theta with the DDPM loss on `images` (n, C, H, W) in [-1, 1] (or VAE latents).

    `seed` defaults to spec.seed. `init_model` fine-tunes a copy of the given model (full or pruned: its own
    architecture is kept) instead of training a fresh one; the caller's model is left untouched. Only parameters
    with requires_grad are optimised: after `attribution.lora.add_lora` that is the adapter alone, and then the
    checkpoints hold just those trainable tensors (load them with strict=False) rather than copies of the frozen
    base; a fully trainable model's checkpoints are full state dicts.

    `conditioning` (n, tokens, dim): per-sample `encoder_hidden_states` of a UNet2DConditionModel (class embeddings
    or prompt encodings), row i conditioning image i. `scheduler_config` replaces model_spec's noise schedule
    (e.g. a Stable Diffusion pipeline's own).
    """
    import copy

    import torch

    from .models import build_scheduler, build_unet

    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"training images must be a non-empty (n, C, H, W) array, got shape {images.shape}")
    seed = spec.seed if seed is None else seed
    n, c, h, w = images.shape
    if conditioning is not None and (conditioning.ndim != 3 or len(conditioning) != n):
        raise ValueError(f"conditioning must be (n, tokens, dim) with one row per training image ({n}), "
                         f"got shape {conditioning.shape}")
    if init_model is None:
        unet = build_unet(model_spec, sample_size=h, channels=c, seed=stable_seed("init", seed))
    else:
        unet = copy.deepcopy(init_model)
    unet.to(device).train()
    cross_dim = getattr(unet.config, "cross_attention_dim", None)
    if conditioning is None and cross_dim is not None:
        raise ValueError(f"{type(unet).__name__} is conditional: pass `conditioning` (n, tokens, dim)")
    if conditioning is not None and cross_dim is None:
        raise ValueError(f"{type(unet).__name__} takes no encoder_hidden_states: drop `conditioning`")
    if conditioning is not None and isinstance(cross_dim, int) and conditioning.shape[-1] != cross_dim:
        raise ValueError(f"conditioning has dim {conditioning.shape[-1]} but the model's cross_attention_dim is "
                         f"{cross_dim}")
    if scheduler_config is None:
        scheduler = build_scheduler(model_spec)
    else:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    T = scheduler.config.num_train_timesteps

    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    cond = None if conditioning is None else torch.from_numpy(
        np.ascontiguousarray(conditioning, dtype=np.float32)).to(device)
    order_gen = torch.Generator().manual_seed(stable_seed("order", seed))
    noise_gen = torch.Generator().manual_seed(stable_seed("noise", seed))
    next_batch = _index_stream(n, min(spec.batch_size, n), order_gen)

    named = dict(unet.named_parameters())
    trainable = [k for k, p in named.items() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter of the model is frozen")
    params = [named[k] for k in trainable]
    keep = None if len(trainable) == len(named) else set(trainable)  # partial (LoRA) checkpoints
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    ema = [p.detach().clone() for p in params] if spec.ema_decay else None

    ckpt_steps = checkpoint_steps(spec)
    last_t = np.full(n, -1, dtype=np.int32)
    last_timesteps, checkpoints, ckpt_lrs = [], [], []
    losses = np.empty(spec.steps, dtype=np.float32)
    lr_sum, lr_steps = 0.0, 0
    start = time.perf_counter()
    for step in range(spec.steps):
        lr = spec.lr * lr_factor(step, spec)
        lr_sum, lr_steps = lr_sum + lr, lr_steps + 1
        for group in opt.param_groups:
            group["lr"] = lr
        idx = next_batch()
        t = torch.randint(0, T, (len(idx),), generator=noise_gen)
        eps = torch.randn((len(idx), c, h, w), generator=noise_gen)
        t_dev, eps = t.to(device), eps.to(device)
        x0 = data[idx.to(device)]
        a = abar[t_dev].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        kw = {} if cond is None else {"encoder_hidden_states": cond[idx.to(device)]}
        loss = torch.mean((unet(x_t, t_dev, **kw).sample - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(spec.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses[step] = loss.item()
        last_t[idx.numpy()] = t.numpy().astype(np.int32)  # a batch spanning two epochs may repeat a sample: last wins
        if step + 1 in ckpt_steps:
            checkpoints.append({k: v.detach().cpu().clone() for k, v in unet.state_dict().items()
                                if keep is None or k in keep})
            last_timesteps.append(last_t.copy())
            ckpt_lrs.append(lr_sum / lr_steps)  # TracIn's sum over steps, one checkpoint per interval
            lr_sum, lr_steps = 0.0, 0
        if progress is not None and ((step + 1) % progress_every == 0 or step + 1 == spec.steps):
            progress(step + 1, float(losses[max(0, step + 1 - progress_every): step + 1].mean()))
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    unet.eval().to("cpu")
    return TrainingResult(
        unet=unet,
        checkpoints=checkpoints,
        checkpoint_steps=ckpt_steps,
        checkpoint_lrs=ckpt_lrs,
        last_timesteps=np.stack(last_timesteps),
        loss_curve=losses,
        wall_seconds=time.perf_counter() - start,
    )
