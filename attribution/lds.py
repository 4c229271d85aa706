"""Linear datamodeling score (LDS) and the noise ceiling that bounds it (DESIGN 2).

Conventions: a score matrix ``scores`` is (q, n) -- one row per query z, one column per training sample, tau(z)_i > 0
meaning sample i is a *proponent* of z. A subset is a boolean row of ``masks`` (m, n). ``actual`` (q, m) is the model
output of each query under each subset model: L_simple(z) of the model retrained on the subset (averaged over the
shared (t, eps) draws and, when available, over training seeds), so LOWER means the subset helps the query.

The predicted output of subset S is sum_{i in S} tau(z)_i, and a good attribution predicts *high* values where the
loss is *low*; ``lds`` therefore correlates the prediction with ``sign * actual`` and the default ``sign = -1``
makes a good method score positive (and a perfect one +1). Use ``sign = +1`` when ``actual`` is a quantity the
proponents increase (e.g. a log-likelihood).

Retraining noise caps the reachable LDS well below 1 at small scale (DESIGN 2, CPU-scale measurement), so every
LDS should be reported next to ``noise_ceiling``, estimated from several training seeds per subset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "LDSResult",
    "ceiling_for_seeds",
    "choose_lambda",
    "group_lds",
    "lds",
    "lds_with_ci",
    "noise_ceiling",
    "predicted_outputs",
    "sample_subsets",
    "spearman_rows",
    "split_subsets",
]


def sample_subsets(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(m, n) bool masks, each keeping exactly round(alpha * n) samples chosen uniformly at random.

    A fixed subset size (rather than independent Bernoulli(alpha) draws) keeps the subset models comparable: their
    outputs then differ by *which* samples they saw, not by how many.
    """
    if n < 2 or m < 1:
        raise ValueError(f"sample_subsets needs n >= 2 training samples and m >= 1 subsets, got n={n}, m={m}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"subset fraction alpha must be in (0, 1), got {alpha}")
    k = int(round(alpha * n))
    if not 1 <= k <= n - 1:
        raise ValueError(f"alpha={alpha} keeps {k} of n={n} samples; every subset must keep between 1 and n-1")
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((m, n)), axis=1)[:, :k]  # a uniform random k-subset per row
    masks = np.zeros((m, n), dtype=bool)
    np.put_along_axis(masks, keep, True, axis=1)
    return masks


def split_subsets(m: int, n_selection: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split subset indices 0..m-1 into disjoint sorted (selection, test) arrays.

    Knobs such as lambda are tuned on the selection subsets only, and the LDS is reported on the test subsets, so
    the reported number is not inflated by the tuning.
    """
    if not 1 <= n_selection <= m - 1:
        raise ValueError(f"n_selection must be in [1, m-1] = [1, {m - 1}] so both splits are non-empty, "
                         f"got {n_selection}")
    perm = np.random.default_rng(seed).permutation(m)
    return np.sort(perm[:n_selection]), np.sort(perm[n_selection:])


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(q, m) additive predictions sum_{i in S_j} tau(z)_i for every query and subset (float64)."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores (q, n) and masks (m, n) must share n; got scores {scores.shape}, masks {masks.shape}")
    if masks.dtype != bool:
        raise ValueError(f"masks must be boolean (m, n), got dtype {masks.dtype}")
    return scores @ masks.astype(np.float64).T


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b (average ranks for ties).

    Equals scipy.stats.spearmanr row by row, vectorised. A row that is constant in a or b has no ranking to compare
    and gives nan; so does a row containing nan.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"spearman_rows needs two (q, m) arrays of the same shape, got {a.shape} and {b.shape}")
    ra = rankdata(a, method="average", axis=1)
    rb = rankdata(b, method="average", axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))


def _check_sign(sign: float) -> float:
    if not np.isfinite(sign) or sign == 0:
        raise ValueError(f"sign must be a non-zero finite number (-1: actual is a loss, +1: a gain), got {sign}")
    return float(sign)


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, sign: float = -1.0) -> np.ndarray:
    """Per-query LDS = Spearman over subsets between the predicted output and ``sign * actual``.

    ``actual`` (q, m) is the query's L_simple under each subset model (lower = the subset helps), so the default
    sign=-1 makes a good attribution (positive tau = proponent) score positive. nan for a query whose predictions or
    outputs do not vary over the subsets.
    """
    pred = predicted_outputs(scores, masks)
    actual = np.asarray(actual, dtype=np.float64)
    if actual.shape != pred.shape:
        raise ValueError(f"actual must be (q, m) = {pred.shape} (queries x subsets), got {actual.shape}")
    return spearman_rows(pred, _check_sign(sign) * actual)


@dataclass(frozen=True, eq=False)  # eq=False: an array field makes field-wise == ambiguous
class LDSResult:
    """Mean LDS over queries with a bootstrap interval.

    ``per_query`` holds every query's LDS, nan included; ``n_queries`` counts the non-nan ones that entered the mean
    and the interval (so ``len(per_query) - n_queries`` queries were dropped). ``n_subsets`` is the number of subsets
    each LDS was computed over.
    """

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    n_queries: int
    n_subsets: int


def lds_with_ci(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, sign: float = -1.0, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95) -> LDSResult:
    """Mean per-query LDS with a percentile bootstrap interval that resamples queries with replacement.

    Only queries are resampled: the interval describes how the mean would move with another draw of queries for
    the same subsets and subset models. It does not cover the subset draw or the retraining noise; the latter is
    what ``noise_ceiling`` quantifies. Queries with nan LDS are dropped; with none left, all numbers are nan.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    per_query = lds(scores, masks, actual, sign)
    valid = per_query[~np.isnan(per_query)]
    n_subsets = int(np.asarray(masks).shape[0])
    if valid.size == 0:
        return LDSResult(float("nan"), float("nan"), float("nan"), per_query, 0, n_subsets)
    rng = np.random.default_rng(seed)
    boot = np.array([valid[rng.integers(0, valid.size, valid.size)].mean() for _ in range(n_boot)])
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return LDSResult(float(valid.mean()), float(low), float(high), per_query, int(valid.size), n_subsets)


def _spearman_from_pearson(r):
    """Spearman correlation of a bivariate Gaussian with Pearson correlation r: (6/pi) arcsin(r/2)."""
    return (6.0 / np.pi) * np.arcsin(np.asarray(r, dtype=np.float64) / 2.0)


def noise_ceiling(outputs: np.ndarray, sign: float = -1.0) -> dict:
    """The LDS a perfect predictor of the subset effect could reach when ``actual`` is the mean over s seeds.

    ``outputs`` (q, m, s) holds each query's output under each of m subset models retrained with s >= 2 seeds.
    Model per query: y[j, r] = mu_j + e[j, r] (subset j, seed r), signal variance var_s = Var_j(mu_j), noise variance
    var_n = Var(e). Per query:

    - var_n  = mean over subsets of the within-subset sample variance across seeds (ddof=1);
    - var_s  = Var_j(ybar_j) (ddof=1) - var_n / s, clipped at 0, since the seed-mean ybar carries var_n / s noise;
    - R      = var_s / (var_s + var_n / s), the reliability of the seed-mean;
    - pearson ceiling  = sqrt(R) = corr(mu, ybar), the best any predictor of mu can correlate with ybar;
    - spearman ceiling = (6/pi) arcsin(pearson / 2), the Gaussian Pearson-to-Spearman conversion (LDS is a Spearman);
    - R1     = var_s / (var_s + var_n), the one-seed reliability, for ``ceiling_for_seeds``.

    ``sign`` is accepted for symmetry with ``lds`` and only validated: a perfect predictor follows the sign, so the
    ceiling is the same for either. Returns the means over queries (nan queries -- no variance at all -- ignored)
    under "pearson", "spearman", "reliability", "reliability_1seed", "signal_var", "noise_var", the per-query arrays
    under "per_query_<name>", and "n_seeds": s.
    """
    _check_sign(sign)
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim != 3:
        raise ValueError(f"outputs must be (queries, subsets, seeds), got shape {y.shape}")
    q, m, s = y.shape
    if s < 2:
        raise ValueError(f"the noise ceiling needs >= 2 training seeds per subset to measure seed-to-seed noise, "
                         f"got outputs with {s} seed(s) (shape {y.shape}); retrain each subset with another seed")
    if m < 2:
        raise ValueError(f"the noise ceiling needs >= 2 subsets to measure the subset effect, got {m}")
    noise_var = y.var(axis=2, ddof=1).mean(axis=1)
    signal_var = np.clip(y.mean(axis=2).var(axis=1, ddof=1) - noise_var / s, 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        reliability = signal_var / (signal_var + noise_var / s)
        reliability_1seed = signal_var / (signal_var + noise_var)
    pearson = np.sqrt(reliability)
    per_query = {
        "pearson": pearson,
        "spearman": _spearman_from_pearson(pearson),
        "reliability": reliability,
        "reliability_1seed": reliability_1seed,
        "signal_var": signal_var,
        "noise_var": noise_var,
    }
    result: dict = {}
    for name, values in per_query.items():
        result[name] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
        result[f"per_query_{name}"] = values
    result["n_seeds"] = s
    return result


def ceiling_for_seeds(reliability_1seed, s_new: int):
    """Spearman LDS ceiling predicted for s_new seeds per subset, by the Spearman-Brown formula.

    R_s = s R1 / (1 + (s - 1) R1), the reliability of a mean of s seeds, turned into a ceiling as in
    ``noise_ceiling``: (6/pi) arcsin(sqrt(R_s) / 2). Accepts a scalar or per-query array of R1 (noise_ceiling's
    "per_query_reliability_1seed"); average the per-query result to get the mean ceiling, since the ceiling is not
    linear in R1.
    """
    if s_new < 1:
        raise ValueError(f"s_new must be >= 1 seed, got {s_new}")
    r1 = np.asarray(reliability_1seed, dtype=np.float64)
    if np.any((r1 < 0) | (r1 > 1)):
        raise ValueError("reliability_1seed must lie in [0, 1]")
    r_s = s_new * r1 / (1.0 + (s_new - 1) * r1)
    ceiling = _spearman_from_pearson(np.sqrt(r_s))
    return float(ceiling) if ceiling.ndim == 0 else ceiling


def choose_lambda(scores_by_lambda: dict, masks_sel: np.ndarray, actual_sel: np.ndarray,
                  sign: float = -1.0) -> tuple[float, dict]:
    """Pick the lambda whose scores give the best mean LDS on the *selection* subsets.

    Only selection masks and outputs are accepted (shapes are checked against each other), so the test subsets
    used for the reported LDS never influence the choice. Ties go to the larger (more regularised) lambda; a lambda
    whose LDS is nan for every query ranks last. Returns (best lambda, {lambda: mean selection LDS}).
    """
    if not scores_by_lambda:
        raise ValueError("scores_by_lambda is empty: give at least one {lambda: (q, n) score matrix}")
    sweep: dict = {}
    for lam, scores in scores_by_lambda.items():
        per_query = lds(scores, masks_sel, actual_sel, sign)
        sweep[lam] = float(np.nanmean(per_query)) if np.any(~np.isnan(per_query)) else float("nan")
    if all(np.isnan(v) for v in sweep.values()):
        raise ValueError("every lambda gave nan LDS on the selection subsets (no variation over the subsets)")
    best = max(sweep, key=lambda lam: (-np.inf if np.isnan(sweep[lam]) else sweep[lam], lam))
    return best, sweep


def group_lds(group_values: np.ndarray, coalitions: np.ndarray, outputs: np.ndarray) -> float:
    """Group-level LDS: Spearman over coalitions between sum_{g in S} phi_g and F(theta_S).

    F is a global property the contributions should increase (quality, diversity), hence sign +1.
    """
    phi = np.asarray(group_values, dtype=np.float64)
    coalitions = np.asarray(coalitions)
    outputs = np.asarray(outputs, dtype=np.float64)
    if phi.ndim != 1 or coalitions.ndim != 2 or coalitions.shape[1] != phi.shape[0]:
        raise ValueError(f"group_values (G,) and coalitions (m, G) must share G; got {phi.shape}, {coalitions.shape}")
    if outputs.shape != (coalitions.shape[0],):
        raise ValueError(f"outputs must be (m,) = ({coalitions.shape[0]},), one F per coalition, got {outputs.shape}")
    pred = predicted_outputs(phi[None, :], coalitions)
    return float(spearman_rows(pred, outputs[None, :])[0])


def group_lds_with_ci(group_values: np.ndarray, coalitions: np.ndarray, outputs: np.ndarray, n_boot: int = 200,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """group_lds and a percentile bootstrap interval over coalitions (resamples with constant F are skipped)."""
    value = group_lds(group_values, coalitions, outputs)
    rng = np.random.default_rng(seed)
    m = len(outputs)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, m, m)
        if np.ptp(outputs[idx]) > 0 and len(np.unique(idx)) > 2:
            boots.append(group_lds(group_values, coalitions[idx], outputs[idx]))
    boots = np.array(boots)
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return value, None, None
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return value, float(low), float(high)
