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
