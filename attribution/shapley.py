"""Group attribution: Shapley and Banzhaf values of data groups (DESIGN 1.5).

A game assigns a number to every coalition of G groups: v(S) = F(theta_S), a global property of the
model trained (or fine-tuned) on the groups in S. A coalition is a (G,) bool mask; row i of
``all_coalitions(G)`` is the mask whose bit g is set iff group g is in, i.e. the integer i in binary.

Because every v(S) costs a fine-tune, the sampling estimators (``kernel_shap``, its convergence curve
and bootstrap, ``banzhaf_from_samples``) work from the (mask, value) pairs a pipeline already
computed, with v(empty) and v(full) passed separately. Exact enumeration and permutation sampling take
a callable (or, for enumeration, a dict of all 2^G values) and are meant for small G and for tests.

Everything is plain numpy, float64, and deterministic given the seeds.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "aggregate_per_sample",
    "all_coalitions",
    "banzhaf_from_samples",
    "exact_banzhaf",
    "exact_shapley",
    "kernel_shap",
    "kernel_shap_bootstrap",
    "kernel_shap_convergence",
    "leave_one_out",
    "loo_coalitions",
    "permutation_shapley",
    "sample_shapley_coalitions",
    "sample_uniform_coalitions",
    "shapley_kernel_size_probs",
]

Game = Union[Callable[[np.ndarray], float], Mapping]

_MAX_ENUM_G = 20     # 2^20 masks x 20 bools = 20 MB: the most all_coalitions will build
_MAX_EXACT_G = 16    # 2^16 game evaluations: beyond this exact values are not a sensible request
_AGGREGATIONS = ("sum", "mean", "max")


# --------------------------------------------------------------------------- validation helpers
def _check_G(G: int, minimum: int = 1) -> int:
    if int(G) != G or G < minimum:
        raise ValueError(f"G (number of groups) must be an integer >= {minimum}, got {G!r}")
    return int(G)


def _check_m(m: int) -> int:
    if int(m) != m or m < 1:
        raise ValueError(f"m (number of coalitions) must be an integer >= 1, got {m!r}")
    return int(m)


def _as_masks(masks) -> np.ndarray:
    """(m, G) bool; 0/1 integers are accepted because stored tables often hold them that way."""
    arr = np.asarray(masks)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"masks must be a non-empty (m, G) array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("masks must be bool or 0/1: one row per coalition, one column per group")
        arr = arr.astype(bool)
    return arr


def _as_values(values, m: int, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (m,):
        raise ValueError(f"{name} must have shape ({m},) -- one per coalition -- got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _as_scalar(x, name: str) -> float:
    x = float(x)
    if not np.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _masks_and_values(masks, values) -> tuple[np.ndarray, np.ndarray]:
    z = _as_masks(masks)
    return z, _as_values(values, z.shape[0])


# --------------------------------------------------------------------------- coalition sampling
def shapley_kernel_size_probs(G: int) -> np.ndarray:
    """p(s) for s = 1..G-1, proportional to (G-1)/(s(G-s)).

    This is the Shapley kernel summed over the C(G, s) coalitions of each size: drawing s from p and then
    a uniform subset of size s samples coalitions with exactly the weights under which the weighted
    least-squares solution is the Shapley value (Lundberg & Lee 2017; Covert & Lee 2021).
    """
    G = _check_G(G, minimum=2)
    s = np.arange(1, G, dtype=np.float64)
    w = (G - 1) / (s * (G - s))
    return w / w.sum()


def _subsets_of_sizes(rng: np.random.Generator, sizes: np.ndarray, G: int) -> np.ndarray:
    """One uniform subset of each requested size: the groups ranked lowest by iid uniform keys."""
    ranks = np.argsort(np.argsort(rng.random((sizes.size, G)), axis=1), axis=1)
    return ranks < sizes[:, None]


def sample_shapley_coalitions(G: int, m: int, seed: int = 0, paired: bool = False) -> np.ndarray:
    """(m, G) bool coalitions from the Shapley kernel; never empty or full (their v is known exactly).

    ``paired=True`` puts each drawn coalition's complement right after it (antithetic sampling: the two
    have the same kernel weight and, for monotone games, negatively correlated values, which lowers
    the estimator's variance), so m must be even.
    """
    G, m = _check_G(G, minimum=2), _check_m(m)
    if paired and m % 2:
        raise ValueError(f"paired sampling returns coalition/complement pairs, so m must be even, got {m}")
    rng = np.random.default_rng(seed)
    n_draw = m // 2 if paired else m
    sizes = rng.choice(np.arange(1, G), size=n_draw, p=shapley_kernel_size_probs(G))
    masks = _subsets_of_sizes(rng, sizes, G)
    if paired:
        masks = np.stack([masks, ~masks], axis=1).reshape(m, G)
    return masks


def sample_uniform_coalitions(G: int, m: int, seed: int = 0) -> np.ndarray:
    """(m, G) bool coalitions with every group in independently with probability 1/2.

    The uniform distribution over all 2^G coalitions is the Banzhaf weighting; empty and full
    coalitions can occur and are valid samples for ``banzhaf_from_samples``.
    """
    G, m = _check_G(G), _check_m(m)
    return np.random.default_rng(seed).random((m, G)) < 0.5


def all_coalitions(G: int) -> np.ndarray:
    """(2^G, G) bool: row i is the coalition whose members are the set bits of i."""
    G = _check_G(G)
    if G > _MAX_ENUM_G:
        raise ValueError(f"all_coalitions enumerates 2^G rows; G={G} exceeds the limit of {_MAX_ENUM_G}")
    return ((np.arange(2 ** G)[:, None] >> np.arange(G)) & 1).astype(bool)


def loo_coalitions(G: int) -> np.ndarray:
    """(G, G) bool: row g is the full coalition without group g (the leave-one-out models to train)."""
    return ~np.eye(_check_G(G), dtype=bool)


# --------------------------------------------------------------------------- exact values
def _game_table(v: Game, G: int, limit_hint: str) -> np.ndarray:
    """v on every coalition, in ``all_coalitions`` order, from a callable or a dict of all 2^G values."""
    G = _check_G(G)
    if G > _MAX_EXACT_G:
        raise ValueError(f"exact enumeration needs 2^G = {2 ** G} game values for G={G} (limit "
                         f"{_MAX_EXACT_G}); {limit_hint}")
    masks = all_coalitions(G)
    masks.flags.writeable = False   # rows are handed to user code: it must not change our table
    if not isinstance(v, Mapping):
        table = np.array([float(v(mask)) for mask in masks])
    else:
        table = np.full(2 ** G, np.nan)
        bits = 1 << np.arange(G)
        for key, value in v.items():
            mask = np.frombuffer(key, dtype=bool) if isinstance(key, bytes) else np.asarray(key, dtype=bool)
            if mask.shape != (G,):
                raise ValueError(f"game dict key {key!r} is not a ({G},) bool mask "
                                 "(use mask.tobytes() or tuple(mask))")
            table[int(bits[mask].sum())] = float(value)
        missing = np.flatnonzero(np.isnan(table))
        if missing.size:
            first = np.flatnonzero(masks[missing[0]]).tolist()
            raise ValueError(f"game dict lacks {missing.size} of the {2 ** G} coalitions, e.g. the one "
                             f"with groups {first}; exact values need every coalition")
    if not np.all(np.isfinite(table)):
        raise ValueError("the game returned NaN or inf for some coalition")
    return table


def _marginal_pairs(G: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each group g, the indices of coalitions S without g and of S + {g}."""
    idx = np.arange(2 ** G)
    pairs = []
    for g in range(G):
        without = idx[((idx >> g) & 1) == 0]
        pairs.append((without, without | (1 << g)))
    return pairs


def exact_shapley(values_by_mask: Game, G: int) -> np.ndarray:
    """Shapley values by enumerating all 2^G coalitions (the ground truth the estimators approximate).

    phi_g = sum_{S not containing g} |S|! (G-|S|-1)! / G! * (v(S + g) - v(S)).
    ``values_by_mask`` is a callable on a (G,) bool mask or a dict holding all 2^G coalitions' values,
    keyed by ``mask.tobytes()`` or by any length-G sequence of bools such as ``tuple(mask)``.
    """
    table = _game_table(values_by_mask, G, "use kernel_shap on sampled coalitions instead")
    sizes = all_coalitions(G).sum(axis=1)
    weight = np.array([1.0 / (G * math.comb(G - 1, s)) for s in range(G)])
    return np.array([np.sum(weight[sizes[w]] * (table[a] - table[w])) for w, a in _marginal_pairs(G)])


def exact_banzhaf(v: Game, G: int) -> np.ndarray:
    """Banzhaf values by enumeration: phi_g = mean over the 2^(G-1) coalitions S without g of v(S+g) - v(S).

    Every coalition counts equally (Shapley weights them by size), which makes Banzhaf values more
    robust to a noisy v; ``v`` is a callable or a dict as in ``exact_shapley``.
    """
    table = _game_table(v, G, "use banzhaf_from_samples on uniform coalitions instead")
    return np.array([np.mean(table[a] - table[w]) for w, a in _marginal_pairs(G)])


# --------------------------------------------------------------------------- KernelSHAP
def _kernel_shap(z: np.ndarray, y: np.ndarray, v0: float, v1: float) -> tuple[np.ndarray, bool]:
    """Constrained KernelSHAP solution and whether A was singular (pseudo-inverse used)."""
    zf = z.astype(np.float64)
    m, G = zf.shape
    A = zf.T @ zf / m
    b = zf.T @ (y - v0) / m
    rhs = np.column_stack([b, np.ones(G)])
    singular = np.linalg.matrix_rank(A) < G
    sol = np.linalg.pinv(A, hermitian=True) @ rhs if singular else np.linalg.solve(A, rhs)
    x, u = sol[:, 0], sol[:, 1]
    # The Lagrange correction moves x along A^-1 1 until sum(beta) = v1 - v0 (efficiency).
    return x - u * (x.sum() - (v1 - v0)) / u.sum(), singular


def _check_kernel_inputs(masks, values, v_empty, v_full):
    z, y = _masks_and_values(masks, values)
    sizes = z.sum(axis=1)
    bad = np.flatnonzero((sizes == 0) | (sizes == z.shape[1]))
    if bad.size:
        raise ValueError(f"masks rows {bad[:10].tolist()} are the empty or full coalition; their values go "
                         "in v_empty / v_full (the Shapley kernel gives them infinite weight), not in the "
                         "samples")
    return z, y, _as_scalar(v_empty, "v_empty"), _as_scalar(v_full, "v_full")


def _singular_warning(what: str) -> None:
    warnings.warn(f"{what}: the coalition matrix A = mean(z z^T) is singular (too few or too "
                  "similar coalitions), so a pseudo-inverse was used; the estimate is still efficient but "
                  "not identified in every direction -- sample more coalitions", RuntimeWarning, stacklevel=3)


def kernel_shap(masks, values, v_empty: float, v_full: float) -> np.ndarray:
    """Closed-form constrained KernelSHAP (Covert & Lee 2021) for coalitions drawn from the Shapley kernel.

    With A = mean(z z^T) and b = mean(z (v(z) - v0)) over the sampled coalitions z,
    beta = A^-1 (b - 1 (1^T A^-1 b - v1 + v0) / (1^T A^-1 1)): the least-squares fit of v(z) - v0 by a
    linear function of z under the constraint sum(beta) = v1 - v0, which it satisfies exactly. The
    kernel weights are not applied here because the coalitions were *sampled* from the kernel
    (``sample_shapley_coalitions``, paired or not). A singular A (fewer than G distinct directions)
    falls back to the pseudo-inverse with a RuntimeWarning.
    """
    z, y, v0, v1 = _check_kernel_inputs(masks, values, v_empty, v_full)
    beta, singular = _kernel_shap(z, y, v0, v1)
    if singular:
        _singular_warning(f"kernel_shap with {z.shape[0]} coalitions")
    return beta


def kernel_shap_convergence(masks, values, v_empty: float, v_full: float,
                            checkpoints: Sequence[int]) -> np.ndarray:
    """(len(checkpoints), G): the KernelSHAP estimate from the first c coalitions for each c.

    This is the convergence curve (estimate vs number of fine-tuned coalitions) shown next to the final
    values; it tells a user whether more coalitions would still move the answer.
    """
    z, y, v0, v1 = _check_kernel_inputs(masks, values, v_empty, v_full)
    cps = [int(c) for c in checkpoints]
    if not cps:
        raise ValueError("checkpoints is empty; give the coalition counts to evaluate, e.g. [16, 32, 64]")
    out_of_range = [c for c in cps if not 1 <= c <= z.shape[0]]
    if out_of_range:
        raise ValueError(f"checkpoints {out_of_range} are outside 1..{z.shape[0]} (the number of coalitions)")
    rows, singular_at = [], []
    for c in cps:
        beta, singular = _kernel_shap(z[:c], y[:c], v0, v1)
        rows.append(beta)
        if singular:
            singular_at.append(c)
    if singular_at:
        _singular_warning(f"kernel_shap_convergence at checkpoints {singular_at}")
    return np.array(rows)


def kernel_shap_bootstrap(masks, values, v_empty: float, v_full: float, n_boot: int = 200, seed: int = 0,
                          level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval (low, high), each (G,), of ``kernel_shap`` over resampled coalitions.

    v(empty) and v(full) are exact, so only the sampled (mask, value) rows are resampled; the spread
    reflects how many coalitions were affordable, not training noise within v.
    """
    z, y, v0, v1 = _check_kernel_inputs(masks, values, v_empty, v_full)
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    m = z.shape[0]
    boots, n_singular = [], 0
    for _ in range(int(n_boot)):
        idx = rng.integers(0, m, size=m)
        beta, singular = _kernel_shap(z[idx], y[idx], v0, v1)
        boots.append(beta)
        n_singular += singular
    if n_singular:
        _singular_warning(f"kernel_shap_bootstrap in {n_singular} of {n_boot} resamples")
    tail = (1 - level) / 2
    low, high = np.quantile(np.array(boots), [tail, 1 - tail], axis=0)
    return low, high


# --------------------------------------------------------------------------- permutation sampling
def permutation_shapley(v: Callable[[np.ndarray], float], G: int, n_permutations: int, seed: int = 0,
                        antithetic: bool = True) -> tuple[np.ndarray, int]:
    """Shapley estimate from marginal contributions along random orderings of the groups.

    Each permutation's contributions telescope to v(full) - v(empty), so every partial estimate is
    efficient. ``antithetic=True`` pairs each ordering with its reverse (n_permutations must be even),
    which cancels much of the order noise. v is cached by mask, so shared prefixes (always the empty and
    full coalitions) cost one evaluation; returns (estimate, number of distinct v evaluations).
    """
    G = _check_G(G)
    if int(n_permutations) != n_permutations or n_permutations < 1:
        raise ValueError(f"n_permutations must be an integer >= 1, got {n_permutations!r}")
    if antithetic and n_permutations % 2:
        raise ValueError(f"antithetic sampling uses permutation/reverse pairs, so n_permutations must be "
                         f"even, got {n_permutations}")
    cache: dict[bytes, float] = {}

    def value(mask: np.ndarray) -> float:
        key = mask.tobytes()
        if key not in cache:
            arg = mask.copy()
            arg.flags.writeable = False
            cache[key] = _as_scalar(v(arg), "v(mask)")
        return cache[key]

    rng = np.random.default_rng(seed)
    n_draw = n_permutations // 2 if antithetic else n_permutations
    total = np.zeros(G)
    for _ in range(n_draw):
        perm = rng.permutation(G)
        for order in (perm, perm[::-1]) if antithetic else (perm,):
            mask = np.zeros(G, dtype=bool)
            prev = value(mask)
            for g in order:
                mask[g] = True
                cur = value(mask)
                total[g] += cur - prev
                prev = cur
    return total / n_permutations, len(cache)


# --------------------------------------------------------------------------- Banzhaf from samples
def banzhaf_from_samples(masks, values) -> np.ndarray:
    """Maximum-sample-reuse (MSR) Banzhaf estimate: phi_g = mean(v | g in S) - mean(v | g not in S).

    On uniform coalitions (``sample_uniform_coalitions``) both conditional means are unbiased for the
    two halves of the Banzhaf difference, and every sampled v(S) is used for every group (Wang & Jia
    2023, "Data Banzhaf"), instead of one marginal pair per evaluation. The difference of means is
    exactly the slope of a simple least-squares fit of v on z_g; groups are independent under uniform
    sampling, so it estimates the coefficient of the least-squares linear fit of v on all of z, which
    is the Banzhaf value (Hammer & Holzman 1992) -- the "least squares" reading of this estimator.
    """
    z, y = _masks_and_values(masks, values)
    n_in = z.sum(axis=0)
    degenerate = np.flatnonzero((n_in == 0) | (n_in == z.shape[0]))
    if degenerate.size:
        raise ValueError(f"groups {degenerate.tolist()} are in every sampled coalition or in none, so their "
                         "Banzhaf value is not identified; sample more (uniform) coalitions")
    zf = z.astype(np.float64)
    return zf.T @ y / n_in - (1 - zf).T @ y / (z.shape[0] - n_in)


# --------------------------------------------------------------------------- baselines
def leave_one_out(v_full: float, v_without: np.ndarray) -> np.ndarray:
    """v(full) - v(full without g), one per group, with v_without evaluated on ``loo_coalitions(G)``.

    The cheapest group attribution (G fine-tunes) and the paper's main baseline: it misses credit that
    is shared between groups (removing one of two redundant groups changes nothing).
    """
    v_without = np.asarray(v_without, dtype=np.float64)
    if v_without.ndim != 1 or v_without.size == 0:
        raise ValueError(f"v_without must be a non-empty (G,) array, got shape {v_without.shape}")
    if not np.all(np.isfinite(v_without)):
        raise ValueError("v_without contains NaN or inf")
    return _as_scalar(v_full, "v_full") - v_without


def aggregate_per_sample(scores, groups, group_order: Sequence, how: str = "sum") -> np.ndarray:
    """(G,) group scores from per-sample attribution scores (the no-retraining baseline).

    ``scores`` is (n,) or a (q, n) query x train matrix, which is first averaged over queries; sample i
    belongs to ``groups[i]`` and the output follows ``group_order``. ``how`` is "sum", "mean" or "max".
    """
    if how not in _AGGREGATIONS:
        raise ValueError(f"how must be one of {_AGGREGATIONS}, got {how!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        s = s.mean(axis=0)
    if s.ndim != 1:
        raise ValueError(f"scores must be (n,) or (q, n), got shape {np.shape(scores)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    groups = np.asarray(groups)
    if groups.shape != s.shape:
        raise ValueError(f"groups must have one id per sample, shape {s.shape}, got {groups.shape}")
    order = list(group_order)
    position = {g: i for i, g in enumerate(order)}
    if len(position) != len(order):
        raise ValueError("group_order contains duplicate groups")
    uniq, inverse = np.unique(groups, return_inverse=True)
    unknown = [u.item() for u in uniq if u.item() not in position]
    if unknown:
        raise ValueError(f"samples belong to groups {unknown} that are not in group_order {order}")
    idx = np.array([position[u.item()] for u in uniq], dtype=np.int64)[inverse.ravel()]
    counts = np.bincount(idx, minlength=len(order))
    empty = [order[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"groups {empty} in group_order have no samples")
    if how == "max":
        out = np.full(len(order), -np.inf)
        np.maximum.at(out, idx, s)
        return out
    sums = np.bincount(idx, weights=s, minlength=len(order))
    return sums if how == "sum" else sums / counts
