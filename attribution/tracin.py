"""Diffusion-TracIn and Diffusion-ReTrac over saved checkpoints (DESIGN 1.3).

TracIn(x_i, z) = sum_c w_c <g_c(x_i), gbar_c(z)>, with g_c(x_i) the loss gradient of x_i at the timestep it
was last trained at before checkpoint c, and gbar_c(z) the query gradient averaged over a timestep grid.
Gradient norms depend strongly on t (~20x from t=50 to t=950 in our measurement), so with plain TracIn a
sample that happened to be trained at a small t is a top proponent of every query. ReTrac removes this by
normalising both sides: train rows here (``renormalize=True``), query rows per timestep before averaging
(``average_query_grads(normalize=True)``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attribution.scoring import _as_f64, unit_rows

__all__ = ["average_query_grads", "lr_weights_from_schedule", "tracin_scores"]


def lr_weights_from_schedule(lrs_at_checkpoints) -> np.ndarray:
    """Checkpoint weights w_c: the learning rates in effect at each checkpoint, as training recorded them."""
    w = np.asarray(lrs_at_checkpoints, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"lr weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("lr weights must be finite and >= 0")
    return w


def average_query_grads(per_timestep, normalize: bool = False) -> np.ndarray:
    """gbar(z): mean over the timestep grid of the query gradient, (m, K, d) -> (m, d).

    Each (m, t) entry is already averaged over noise draws. normalize=True (ReTrac) divides every
    per-timestep gradient by its L2 norm first, so no timestep dominates through its norm; a
    zero gradient then contributes zero.
    """
    g = _as_f64(per_timestep, "per_timestep", ndim=3)
    if normalize:
        m, k, d = g.shape
        g = unit_rows(g.reshape(m * k, d)).reshape(m, k, d)
    return g.mean(axis=1)


def tracin_scores(
    train_grads: Sequence,
    query_grads: Sequence,
    lr_weights,
    renormalize: bool = False,
) -> np.ndarray:
    """(m, n) TracIn scores sum_c w_c gbar_c(z) . g_c(x_i); ReTrac's train side when renormalize=True.

    train_grads[c] is (n, d), query_grads[c] is (m, d) (already averaged, see average_query_grads).
    With renormalize=True each train row is divided by its L2 norm (zero rows contribute nothing),
    so scores are invariant to rescaling any train gradient by a positive constant.
    """
    w = lr_weights_from_schedule(lr_weights)
    if not (len(train_grads) == len(query_grads) == w.size):
        raise ValueError(
            f"checkpoint counts differ: {len(train_grads)} train, {len(query_grads)} query, {w.size} weights"
        )
    out = None
    for c, (g_train, g_query, w_c) in enumerate(zip(train_grads, query_grads, w)):
        g_train = _as_f64(g_train, f"train_grads[{c}]")
        g_query = _as_f64(g_query, f"query_grads[{c}]")
        if g_train.shape[1] != g_query.shape[1]:
            raise ValueError(f"checkpoint {c}: gradient dims differ ({g_train.shape[1]} vs {g_query.shape[1]})")
        if renormalize:
            g_train = unit_rows(g_train)
        if out is None:
            out = np.zeros((g_query.shape[0], g_train.shape[0]))
        elif out.shape != (g_query.shape[0], g_train.shape[0]):
            raise ValueError(f"checkpoint {c}: (m, n) = {(g_query.shape[0], g_train.shape[0])}, expected {out.shape}")
        out += w_c * (g_query @ g_train.T)
    return out
