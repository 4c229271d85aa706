"""Deterministic DDIM generation: image j of a query set always starts from the noise of seed (seed, j), whatever
the batch, so a regenerated image after retraining (counterfactual evaluation) is comparable to the original."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .runtime import stable_seed


@dataclass
class Samples:
    images: np.ndarray        # (m, C, H, W) float32 in [-1, 1]
    seeds: np.ndarray         # (m,) int64 per-image seeds
    timesteps: np.ndarray     # (S,) the DDIM timesteps visited, in sampling order
    x0_hat: np.ndarray | None  # (m, S, C, H, W) predicted clean image at each step (Journey-TRAK), if recorded


def initial_noise(seeds, shape):
    import torch

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def image_seeds(seed: int, count: int, offset: int = 0) -> np.ndarray:
    return np.array([stable_seed("sample", seed, j) for j in range(offset, offset + count)], dtype=np.int64)


def ddim_sample(unet, scheduler_config: dict, seeds, shape, steps: int = 50, batch_size: int = 64,
                record_trajectory: bool = False, device: str = "cpu", encoder_hidden_states=None,
                clip: bool = True) -> Samples:
    """eta=0 DDIM: deterministic given the initial noise; the result is clipped to [-1, 1] (pixels; clip=False
    for latents).

    `encoder_hidden_states` (m, tokens, dim), one row per seed, conditions a UNet2DConditionModel."""
    import torch
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    seeds = np.asarray(seeds, dtype=np.int64)
    out, traj = [], []
    unet = unet.to(device).eval()
    cond = None if encoder_hidden_states is None else torch.as_tensor(encoder_hidden_states, dtype=torch.float32)
    if cond is not None and len(cond) != len(seeds):
        raise ValueError(f"encoder_hidden_states has {len(cond)} rows for {len(seeds)} seeds")
    with torch.no_grad():
        for start in range(0, len(seeds), batch_size):
            x = initial_noise(seeds[start:start + batch_size], shape).to(device)
            x0s = []
            kw = {} if cond is None else {"encoder_hidden_states": cond[start:start + batch_size].to(device)}
            for t in ddim.timesteps:
                eps = unet(x, t.to(device), **kw).sample
                step = ddim.step(eps, t, x, eta=0.0)
                x = step.prev_sample
                if record_trajectory:
                    x0s.append((step.pred_original_sample.clamp(-1, 1) if clip else step.pred_original_sample).cpu())
            out.append((x.clamp(-1, 1) if clip else x).cpu())
            if record_trajectory:
                traj.append(torch.stack(x0s, dim=1))
    images = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, *shape), np.float32)
    return Samples(
        images=images,
        seeds=seeds,
        timesteps=ddim.timesteps.numpy().astype(np.int64),
        x0_hat=torch.cat(traj).numpy().astype(np.float32) if record_trajectory and traj else None,
    )
