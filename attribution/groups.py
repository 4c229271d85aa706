"""Data contributors (DESIGN 1.5): groups of training images, and the training rows of a coalition of groups.

A coalition is a (G,) bool mask over the groups in a fixed order; its id (a bit string) names its partition and
its model, so every coalition model can be traced back to the exact groups it was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class GroupError(ValueError):
    """A group spec does not match the data; the message names the group and what to do."""


@dataclass(frozen=True)
class Groups:
    names: tuple[str, ...]
    membership: np.ndarray      # (G, n) bool: membership[g, i] = training image i belongs to group g

    @property
    def sizes(self) -> np.ndarray:
        return self.membership.sum(axis=1)

    def rows(self, coalition: np.ndarray) -> np.ndarray:
        """Sorted training rows of the groups in the coalition."""
        coalition = np.asarray(coalition, dtype=bool)
        if coalition.shape != (len(self.names),):
            raise GroupError(f"coalition mask has shape {coalition.shape}, expected ({len(self.names)},)")
        return np.flatnonzero(self.membership[coalition].any(axis=0))


def build_groups(sample_groups: np.ndarray, order: Sequence[str] | None = None) -> Groups:
    """Groups from each training image's group label, in `order` (default: sorted names)."""
    sample_groups = np.asarray(sample_groups).astype(str)
    present = sorted(set(sample_groups.tolist()))
    names = tuple(present if order is None else (str(g) for g in order))
    if len(set(names)) != len(names):
        raise GroupError(f"group order {list(names)} repeats a group")
    empty = [g for g in names if g not in present]
    if empty:
        raise GroupError(f"groups {empty} have no training images (groups in the data: {present}): remove them "
                         "from the experiment's group list or check the data's group column")
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise GroupError(f"training images belong to groups {unknown} that the group list {list(names)} omits: "
                         "add them, or filter the data with data.classes")
    membership = np.stack([sample_groups == g for g in names])
    return Groups(names=names, membership=membership)


def coalition_id(coalition: np.ndarray) -> str:
    """'c' + one bit per group, e.g. c0110100101: stable, readable, a valid partition key."""
    return "c" + "".join("1" if b else "0" for b in np.asarray(coalition, dtype=bool))


def parse_coalition_id(cid: str, n_groups: int) -> np.ndarray:
    bits = cid[1:]
    if not cid.startswith("c") or len(bits) != n_groups or set(bits) - {"0", "1"}:
        raise GroupError(f"{cid!r} is not a coalition id over {n_groups} groups (expected 'c' + {n_groups} bits)")
    return np.array([b == "1" for b in bits])


@dataclass(frozen=True)
class CoalitionPlan:
    """Every coalition a group-attribution run evaluates, fixed by (G, counts, seed) before any training, so the
    coalition models can be static partitions. kernel: Shapley-kernel samples with their complements; banzhaf:
    uniform samples; loo: full minus one group; lds: held-out coalitions keeping half the groups (retrained only)."""

    kernel: np.ndarray
    banzhaf: np.ndarray
    loo: np.ndarray
    lds: np.ndarray

    @property
    def n_groups(self) -> int:
        return self.loo.shape[1]

    def model_coalitions(self, method: str) -> list[str]:
        """Distinct coalition ids that need a model under `method`. The empty coalition is the null model; the full
        one is the base model when retraining (same recipe, same data), a partition when fine-tuning."""
        G = self.n_groups
        masks = [self.kernel, self.banzhaf, self.loo, np.ones((1, G), bool)]
        if method == "retrain":
            masks.append(self.lds)
        ids = dict.fromkeys(coalition_id(m) for m in np.concatenate(masks))
        ids.pop(coalition_id(np.zeros(G, bool)), None)
        if method == "retrain":
            ids.pop(coalition_id(np.ones(G, bool)), None)
        return list(ids)


def half_coalitions(G: int, m: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(m, G) distinct coalitions of G // 2 groups, none of them in `exclude` (held out from the fitted ones)."""
    from math import comb

    excluded = {coalition_id(x) for x in (exclude if exclude is not None else [])}
    available = comb(G, G // 2) - sum(1 for c in excluded if c.count("1") == G // 2)
    if m > available:
        raise GroupError(f"{m} held-out half coalitions requested but only {available} exist for {G} groups: "
                         "lower shapley.lds_coalitions")
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    while len(out) < m:
        mask = np.zeros(G, bool)
        mask[rng.choice(G, G // 2, replace=False)] = True
        cid = coalition_id(mask)
        if cid not in excluded:
            out.setdefault(cid, mask)
    return np.stack(list(out.values())) if out else np.zeros((0, G), bool)


def plan_coalitions(G: int, n_kernel: int, n_banzhaf: int, n_lds: int, seed: int) -> CoalitionPlan:
    from .runtime import stable_seed
    from .shapley import loo_coalitions, sample_shapley_coalitions, sample_uniform_coalitions

    kernel = sample_shapley_coalitions(G, n_kernel, seed=stable_seed("kernel", seed) % 2**32, paired=True)
    banzhaf = (sample_uniform_coalitions(G, n_banzhaf, seed=stable_seed("banzhaf", seed) % 2**32) if n_banzhaf
               else np.zeros((0, G), bool))
    lds = half_coalitions(G, n_lds, stable_seed("group-lds", seed) % 2**32, exclude=kernel)
    return CoalitionPlan(kernel=kernel, banzhaf=banzhaf, loo=loo_coalitions(G), lds=lds)
