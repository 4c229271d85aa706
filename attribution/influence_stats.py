""""Generally influential" statistics for any (m, n) score matrix (DESIGN 1.3).

A method suffering from the timestep/norm bias returns the same few training samples as top proponents
of every query. Two numbers expose it: how many distinct training samples fill the m*k top-k slots
(TracIn on TinyImageNet: 374 unique in 800 top-50 slots), and for each training sample the fraction of
queries whose top-k contains it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["influence_summary", "top_k", "top_k_frequency", "unique_in_top_k"]


def top_k(scores, k: int, largest: bool = True) -> np.ndarray:
    """(m, k) train indices of each query's top-k, best first; ties go to the lower train index.

    A stable sort makes this deterministic, so summaries and counterfactual removals are reproducible.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (m, n), got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in [1, n={s.shape[1]}], got {k}")
    order = np.argsort(-s if largest else s, axis=1, kind="stable")
    return order[:, :k]


def unique_in_top_k(scores, k: int, largest: bool = True) -> int:
    """Number of distinct training samples in the union of the m top-k lists."""
    return int(np.unique(top_k(scores, k, largest)).size)


def top_k_frequency(scores, k: int, largest: bool = True) -> np.ndarray:
    """(n,) fraction of queries whose top-k contains each training sample."""
    idx = top_k(scores, k, largest)
    m, n = np.shape(scores)
    # A row of top_k has distinct indices, so a count per column is a count of queries.
    return np.bincount(idx.ravel(), minlength=n) / m


def influence_summary(scores, k: int, largest: bool = True, n_most: int = 10) -> dict:
    """JSON-able summary: unique count, slots (m*k), max frequency and the most frequent train ids."""
    freq = top_k_frequency(scores, k, largest)
    m = np.shape(scores)[0]
    order = np.argsort(-freq, kind="stable")[:n_most]  # ties: lower train id first
    order = order[freq[order] > 0]
    unique = int(np.count_nonzero(freq))
    return {
        "k": int(k),
        "n_queries": int(m),
        "n_train": int(freq.size),
        "unique": unique,
        "slots": int(m * k),
        "unique_fraction": unique / (m * k),
        "max_frequency": float(freq.max()),
        "most_frequent": [{"train_id": int(i), "frequency": float(freq[i])} for i in order],
    }
