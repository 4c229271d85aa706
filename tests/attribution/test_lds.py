"""LDS, bootstrap interval, noise ceiling and lambda selection, each checked against an independent computation."""
import inspect
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from attribution import lds as L


def _additive_case(q=20, n=100, m=200, noise=0.01, seed=0):
    """Outputs that ARE additive in the true scores: actual = -(sum of tau over the subset) + noise."""
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(q, n))
    masks = L.sample_subsets(n, m, seed=seed)
    actual = -(masks.astype(float) @ tau.T).T + noise * rng.normal(size=(q, m))
    return tau, masks, actual


# ----------------------------------------------------------------------------- subsets
def test_sample_subsets_exact_size_and_deterministic():
    masks = L.sample_subsets(11, 50, alpha=0.5, seed=3)
    assert masks.shape == (50, 11) and masks.dtype == bool
    assert (masks.sum(axis=1) == round(0.5 * 11)).all()
    np.testing.assert_array_equal(masks, L.sample_subsets(11, 50, alpha=0.5, seed=3))
    assert not np.array_equal(masks, L.sample_subsets(11, 50, alpha=0.5, seed=4))
    assert (L.sample_subsets(20, 5, alpha=0.3).sum(axis=1) == 6).all()
    # uniform: every sample is kept about alpha of the time
    freq = L.sample_subsets(10, 4000, seed=1).mean(axis=0)
    assert np.abs(freq - 0.5).max() < 0.04
    with pytest.raises(ValueError, match="alpha"):
        L.sample_subsets(10, 5, alpha=1.0)


def test_split_subsets_disjoint_covering():
    sel, test = L.split_subsets(30, 10, seed=2)
    assert len(sel) == 10 and len(test) == 20
    assert np.all(np.diff(sel) > 0) and np.all(np.diff(test) > 0)
    assert not set(sel) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([sel, test])), np.arange(30))
    sel2, _ = L.split_subsets(30, 10, seed=2)
    np.testing.assert_array_equal(sel, sel2)
    for bad in (0, 30):
        with pytest.raises(ValueError, match="n_selection"):
            L.split_subsets(30, bad)


def test_predicted_outputs_is_subset_sum():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 7))
    masks = L.sample_subsets(7, 5)
    pred = L.predicted_outputs(scores, masks)
    for a in range(3):
        for j in range(5):
            assert math.isclose(pred[a, j], scores[a][masks[j]].sum(), rel_tol=1e-12, abs_tol=1e-12)


# ----------------------------------------------------------------------------- spearman
def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(8, 30)).astype(float)  # many ties
    b = a + rng.integers(-3, 4, size=(8, 30))
    got = L.spearman_rows(a, b)
    for i in range(8):
        assert math.isclose(got[i], spearmanr(a[i], b[i]).statistic, rel_tol=1e-12, abs_tol=1e-12)
    a[2] = 1.0
    got = L.spearman_rows(a, b)
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()


# ----------------------------------------------------------------------------- LDS
def test_lds_additive_model_and_sign():
    tau, masks, actual = _additive_case()
    good = L.lds(tau, masks, actual)
    assert good.min() > 0.95
    rnd = L.lds(np.random.default_rng(9).normal(size=tau.shape), masks, actual)
    assert abs(rnd.mean()) < 0.1
    flipped = L.lds(tau, masks, actual, sign=1.0)
    assert flipped.max() < -0.95
    np.testing.assert_allclose(L.lds(-tau, masks, actual), flipped)


def test_lds_with_ci_contains_mean_narrows_and_is_deterministic():
    rng = np.random.default_rng(1)
    n, m = 40, 60
    masks = L.sample_subsets(n, m, seed=1)

    def result(q, seed):
        tau = rng.normal(size=(q, n))
        actual = -(masks @ tau.T).T + 6.0 * rng.normal(size=(q, m))  # noisy: LDS well inside (0, 1)
        return L.lds_with_ci(tau, masks, actual, n_boot=500, seed=seed)

    small, big = result(20, 0), result(400, 0)
    for r in (small, big):
        assert r.ci_low < r.mean < r.ci_high
        assert r.n_subsets == m
    assert small.n_queries == 20 and big.n_queries == 400
    assert (big.ci_high - big.ci_low) < 0.5 * (small.ci_high - small.ci_low)
    # independent check of the mean and determinism given the seed
    assert math.isclose(big.mean, big.per_query.mean())
    tau = rng.normal(size=(10, n))
    actual = -(masks @ tau.T).T + 6.0 * rng.normal(size=(10, m))
    r1 = L.lds_with_ci(tau, masks, actual, seed=5)
    r2 = L.lds_with_ci(tau, masks, actual, seed=5)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)


def test_lds_with_ci_drops_nan_queries():
    tau, masks, actual = _additive_case(q=5, m=30)
    actual[1] = 3.0  # a query whose output never changes: no ranking
    r = L.lds_with_ci(tau, masks, actual, n_boot=50)
    assert np.isnan(r.per_query[1]) and r.n_queries == 4
    assert math.isclose(r.mean, np.delete(r.per_query, 1).mean())


# ----------------------------------------------------------------------------- noise ceiling
def _seeded_outputs(q=200, m=60, s=3, var_s=1.0, var_n=3.0, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(scale=math.sqrt(var_s), size=(q, m))
    return mu, mu[:, :, None] + rng.normal(scale=math.sqrt(var_n), size=(q, m, s))


def test_noise_ceiling_known_variances():
    mu, y = _seeded_outputs()
    c = L.noise_ceiling(y)
    assert c["n_seeds"] == 3
    assert abs(c["noise_var"] - 3.0) < 0.15 and abs(c["signal_var"] - 1.0) < 0.1
    assert abs(c["pearson"] - math.sqrt(1.0 / (1.0 + 3.0 / 3))) < 0.05
    assert c["per_query_spearman"].shape == (200,)
    # a perfect predictor of the subset effect (the true mu) ranked against the seed-mean it is scored on
    perfect = L.spearman_rows(mu, y.mean(axis=2))
    assert abs(perfect.mean() - c["spearman"]) < 0.05
    # the sign convention does not move the ceiling
    assert L.noise_ceiling(y, sign=1.0)["spearman"] == c["spearman"]


def test_ceiling_for_seeds_spearman_brown():
    _, y = _seeded_outputs(q=50)
    c = L.noise_ceiling(y)
    r1 = c["per_query_reliability_1seed"]
    for s_new in (1, 3, 8):
        r_s = s_new * r1 / (1 + (s_new - 1) * r1)
        np.testing.assert_allclose(L.ceiling_for_seeds(r1, s_new), 6 / math.pi * np.arcsin(np.sqrt(r_s) / 2))
    # with s_new = the measured s it reproduces the measured ceiling, and more seeds raise it
    np.testing.assert_allclose(L.ceiling_for_seeds(r1, 3), c["per_query_spearman"])
    ceilings = [L.ceiling_for_seeds(0.25, s) for s in (1, 2, 4, 8, 16)]
    assert all(b > a for a, b in zip(ceilings, ceilings[1:]))
    assert isinstance(ceilings[0], float)


def test_noise_ceiling_needs_two_seeds():
    with pytest.raises(ValueError, match=">= 2 training seeds"):
        L.noise_ceiling(np.zeros((3, 10, 1)))


# ----------------------------------------------------------------------------- lambda selection
def test_choose_lambda_picks_true_scores_on_selection_only():
    tau, masks, actual = _additive_case(q=10, n=60, m=80, noise=0.5)
    rng = np.random.default_rng(3)
    sel, test = L.split_subsets(80, 30, seed=0)
    candidates = {0.01: tau + 3.0 * rng.normal(size=tau.shape), 0.1: tau, 1.0: tau + 1.0 * rng.normal(size=tau.shape)}
    best, sweep = L.choose_lambda(candidates, masks[sel], actual[:, sel])
    assert best == 0.1 and set(sweep) == set(candidates)
    assert sweep[0.1] > sweep[1.0] > sweep[0.01]
    for lam, scores in candidates.items():
        assert math.isclose(sweep[lam], L.lds(scores, masks[sel], actual[:, sel]).mean())


def test_choose_lambda_never_sees_test_subsets():
    tau, masks, actual = _additive_case(q=10, n=60, m=80, noise=0.5)
    sel, test = L.split_subsets(80, 30, seed=0)
    candidates = {0.1: tau, 1.0: -tau}
    # poison the test subsets so that -tau would win there: the choice must not change
    poisoned = actual.copy()
    poisoned[:, test] *= -1.0
    assert L.lds(-tau, masks[test], poisoned[:, test]).mean() > 0.9
    best_clean, sweep_clean = L.choose_lambda(candidates, masks[sel], actual[:, sel])
    best_poisoned, sweep_poisoned = L.choose_lambda(candidates, masks[sel], poisoned[:, sel])
    assert best_clean == best_poisoned == 0.1 and sweep_clean == sweep_poisoned
    # the API has no way to receive test subsets, and refuses outputs that do not match the selection masks
    assert list(inspect.signature(L.choose_lambda).parameters) == ["scores_by_lambda", "masks_sel", "actual_sel", "sign"]
    with pytest.raises(ValueError, match="actual"):
        L.choose_lambda(candidates, masks[sel], poisoned)


def test_choose_lambda_tie_goes_to_larger_lambda():
    tau, masks, actual = _additive_case(q=4, n=30, m=20)
    best, _ = L.choose_lambda({0.01: tau, 10.0: 2.0 * tau, 1.0: tau}, masks, actual)
    assert best == 10.0


# ----------------------------------------------------------------------------- group LDS
def test_group_lds_hand_example():
    phi = np.array([3.0, -1.0, 0.5, 2.0])
    coalitions = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=bool)
    outputs = np.array([1.0, -2.0, 5.0, 0.7, 0.9])
    # predicted sums by hand: 2, -0.5, 5.5, 2.5, 2.5 (a tie)
    expected = spearmanr([2.0, -0.5, 5.5, 2.5, 2.5], outputs).statistic
    assert math.isclose(L.group_lds(phi, coalitions, outputs), expected, rel_tol=1e-12)


def test_group_lds_with_ci_matches_scipy_and_brackets_value():
    from scipy.stats import spearmanr

    from attribution.lds import group_lds_with_ci

    rng = np.random.default_rng(0)
    phi = rng.normal(size=6)
    masks = rng.random((20, 6)) < 0.5
    outputs = masks @ phi + 0.3 * rng.normal(size=20)
    value, low, high = group_lds_with_ci(phi, masks, outputs, n_boot=200, seed=1)
    assert value == pytest.approx(spearmanr(masks @ phi, outputs).statistic, abs=1e-12)
    assert low <= value <= high and value > 0.5
    assert group_lds_with_ci(phi, masks, outputs, n_boot=200, seed=1) == (value, low, high)
