"""The "actual output" of the LDS protocol: a query's DDPM loss under a model, averaged over a fixed set of
(t, eps) draws that every model shares, so differences between models are differences of the models only."""
from __future__ import annotations

import numpy as np


def output_grid(n_timesteps: int, T: int) -> np.ndarray:
    """An even grid of n timesteps over [0, T), centred in its cells so both ends of the schedule count."""
    return ((np.arange(n_timesteps) + 0.5) * T / n_timesteps).astype(np.int64)


def query_losses(unet, schedule, images: np.ndarray, *, n_timesteps: int, n_noises: int, seed: int,
                 batch_size: int = 256, device: str = "cpu", cond: np.ndarray | None = None) -> np.ndarray:
    """(m,) mean L_simple of each image over the grid x n_noises draws; draw r of query j at t comes from
    sample_noise(seed, j, t, r), identical for every model evaluated. `cond` (m, tokens, dim): each query's
    encoder_hidden_states for a conditional model."""
    import torch

    from .runtime import single_thread
    from .timesteps import sample_noise

    T = schedule.num_train_timesteps
    ts = output_grid(n_timesteps, T)
    pairs = [(j, int(t), r) for j in range(len(images)) for t in ts for r in range(n_noises)]
    shape = tuple(images.shape[1:])
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    c_all = None if cond is None else torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))
    losses = np.zeros(len(images), dtype=np.float64)
    unet = unet.to(device).eval()
    with single_thread(), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            j = torch.tensor([c[0] for c in chunk])
            t = torch.tensor([c[1] for c in chunk])
            eps = torch.stack([sample_noise(seed, c[0], c[1], shape, draw=c[2]) for c in chunk])
            x_t = schedule.add_noise(x_all[j], eps, t)
            kw = {} if c_all is None else {"encoder_hidden_states": c_all[j].to(device)}
            pred = unet(x_t.to(device), t.to(device), **kw).sample.cpu()
            per = ((pred - eps) ** 2).flatten(1).mean(1).double().numpy()
            np.add.at(losses, j.numpy(), per)
    return losses / (len(ts) * n_noises)
