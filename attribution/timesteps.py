"""Timestep sets S and noise draws for TRAK-family features (DESIGN.md 1.1-1.3).

Everything here is a pure function of integer seeds, so a sample's timesteps and noise never depend on the batch,
the shard, the process or the thread count:

* ``timesteps("uniform", K, T, ...)``: the grid {0, T/K, 2T/K, ...} (integer division), same for every sample
  (D-TRAK; K = 10, 100 or 1000).
* ``timesteps("random", K, T, sample_ids, seed)``: K draws with replacement from {0..T-1} per sample, from a generator
  seeded by (seed, sample_id) (Journey-TRAK's train features).
* :func:`noise`: the common-random-numbers draw for timestep t, shared by every sample, train and query alike
  (what D-TRAK does).
* :func:`sample_noise`: a fresh per-sample draw for (sample_id, t) (Journey-TRAK train features, TracIn).

Seeds are derived with BLAKE2b of the integers (never Python's salted ``hash()``), tagged with a domain string so
that e.g. ``noise(s, t)`` and ``sample_noise(s, i, t)`` are unrelated streams.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .runtime import stable_seed

__all__ = [
    "TIMESTEP_STRATEGIES",
    "timesteps",
    "noise",
    "sample_noise",
    "common_noise_fn",
    "sample_noise_fn",
]

TIMESTEP_STRATEGIES = ("uniform", "random")


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _ids(sample_ids) -> list[int]:
    if isinstance(sample_ids, Tensor):
        return [int(v) for v in sample_ids.reshape(-1).tolist()]
    return [int(v) for v in sample_ids]


def timesteps(strategy: str, K: int, T: int, sample_ids: Sequence[int] | Tensor, seed: int = 0) -> Tensor:
    """LongTensor (B, K) of timesteps for the samples ``sample_ids`` (B = len(sample_ids)).

    ``uniform``: row = (arange(K) * T) // K for every sample (``seed`` unused).  For K=10, T=1000: 0, 100, ..., 900.
    ``random``:  row i = ``randint(0, T, (K,))`` from a generator seeded by (seed, sample_ids[i]).
    """
    ids = _ids(sample_ids)
    K, T = int(K), int(T)
    if K < 1 or T < 1:
        raise ValueError(f"need K >= 1 and T >= 1, got K={K}, T={T}")
    if strategy == "uniform":
        if K > T:
            raise ValueError(f"a uniform grid of K={K} points needs K <= T={T}")
        grid = torch.arange(K, dtype=torch.long) * T // K
        return grid.unsqueeze(0).expand(len(ids), K).contiguous()
    if strategy == "random":
        out = torch.empty(len(ids), K, dtype=torch.long)
        for row, sid in enumerate(ids):
            out[row] = torch.randint(0, T, (K,), generator=_generator(stable_seed("timesteps", seed, sid)))
        return out
    raise ValueError(f"unknown timestep strategy {strategy!r}; known: {', '.join(TIMESTEP_STRATEGIES)}")


def noise(noise_seed: int, t: int, shape: Sequence[int], draw: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The standard-normal draw shared by every sample at timestep ``t`` (common random numbers).

    ``draw`` selects an independent extra draw at the same timestep (several noises per timestep).
    """
    g = _generator(stable_seed("noise", noise_seed, int(t), int(draw)))
    return torch.randn(tuple(shape), generator=g, dtype=dtype)


def sample_noise(
    noise_seed: int, sample_id: int, t: int, shape: Sequence[int], draw: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A fresh standard-normal draw for one sample at timestep ``t`` (independent of every other sample)."""
    g = _generator(stable_seed("sample_noise", noise_seed, int(sample_id), int(t), int(draw)))
    return torch.randn(tuple(shape), generator=g, dtype=dtype)


def common_noise_fn(noise_seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Callable[..., Tensor]:
    """``eps_fn(t, row, draw=0)`` for :meth:`GradientEngine.averaged_grads`: :func:`noise` (cached per (t, draw))."""
    cache: dict[tuple[int, int], Tensor] = {}

    def eps_fn(t: int, row: int, draw: int = 0) -> Tensor:
        key = (int(t), int(draw))
        if key not in cache:
            cache[key] = noise(noise_seed, key[0], shape, key[1], dtype)
        return cache[key]

    return eps_fn


def sample_noise_fn(
    noise_seed: int, sample_ids: Sequence[int] | Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> Callable[..., Tensor]:
    """``eps_fn(t, row, draw=0)``: :func:`sample_noise` for ``sample_ids[row]`` (row = index within the batch)."""
    ids = _ids(sample_ids)

    def eps_fn(t: int, row: int, draw: int = 0) -> Tensor:
        return sample_noise(noise_seed, ids[row], t, shape, draw, dtype)

    return eps_fn
