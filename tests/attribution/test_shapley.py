"""Group attribution (Shapley / Banzhaf), each checked against an independent computation."""
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.stats import chi2

from attribution import shapley as sh


# ----------------------------------------------------------------------------- games
def additive(w, c=0.0):
    w = np.asarray(w, dtype=np.float64)
    return lambda mask: c + float(w[mask].sum())


def squared(w):
    """v(S) = (sum_{g in S} w_g)^2: pairwise interactions, Shapley value w_g * sum(w) by symmetry."""
    w = np.asarray(w, dtype=np.float64)
    return lambda mask: float(w[mask].sum()) ** 2


def majority(w, quota):
    """Weighted voting game: 1 if the coalition's weight reaches the quota."""
    w = np.asarray(w, dtype=np.float64)
    return lambda mask: float(w[mask].sum() >= quota)


def mask_of(members, G):
    mask = np.zeros(G, dtype=bool)
    mask[list(members)] = True
    return mask


def shapley_by_permutations(v, G):
    """Average marginal contribution over all G! orderings -- the definition, with no weights."""
    phi = np.zeros(G)
    for order in itertools.permutations(range(G)):
        members = []
        for g in order:
            before = v(mask_of(members, G))
            members.append(g)
            phi[g] += v(mask_of(members, G)) - before
    return phi / math.factorial(G)


def banzhaf_by_definition(v, G):
    """Mean of v(S + g) - v(S) over all subsets S of the other groups, listed with itertools."""
    phi = np.zeros(G)
    for g in range(G):
        others = [h for h in range(G) if h != g]
        diffs = [v(mask_of(S + (g,), G)) - v(mask_of(S, G))
                 for r in range(G) for S in itertools.combinations(others, r)]
        phi[g] = np.mean(diffs)
    return phi


def sample_values(v, masks):
    return np.array([v(m) for m in masks])


VOTE5 = majority([4, 3, 2, 1, 1], quota=6)
VOTE8_W, VOTE8_Q = [5, 4, 3, 3, 2, 2, 1, 1], 11


# ----------------------------------------------------------------------------- coalitions
def test_all_coalitions_enumerates_binary_integers():
    masks = sh.all_coalitions(4)
    assert masks.shape == (16, 4) and masks.dtype == bool
    assert len({m.tobytes() for m in masks}) == 16
    np.testing.assert_array_equal(masks[0b1010], [False, True, False, True])
    with pytest.raises(ValueError, match="G=21"):
        sh.all_coalitions(21)


def test_size_probs_match_formula():
    for G in (2, 5, 10):
        p = sh.shapley_kernel_size_probs(G)
        s = np.arange(1, G)
        raw = (G - 1) / (s * (G - s))
        assert p.shape == (G - 1,)
        np.testing.assert_allclose(p, raw / raw.sum(), rtol=1e-14)
        assert abs(p.sum() - 1) < 1e-12
    with pytest.raises(ValueError, match="G"):
        sh.shapley_kernel_size_probs(1)


@pytest.mark.parametrize("paired", [False, True])
def test_kernel_sampler_sizes_follow_p_and_are_never_trivial(paired):
    G, m = 10, 20000
    masks = sh.sample_shapley_coalitions(G, m, seed=3, paired=paired)
    assert masks.shape == (m, G) and masks.dtype == bool
    sizes = masks.sum(axis=1)
    assert sizes.min() >= 1 and sizes.max() <= G - 1
    expected = m * sh.shapley_kernel_size_probs(G)
    observed = np.bincount(sizes, minlength=G)[1:]
    stat = np.sum((observed - expected) ** 2 / expected)
    assert stat < chi2.ppf(0.999, df=G - 2)
    # within a size the subset is uniform, so by symmetry every group is in half the coalitions
    assert np.all(np.abs(masks.mean(axis=0) - 0.5) < 0.02)


def test_paired_sampler_puts_complements_next_to_draws():
    masks = sh.sample_shapley_coalitions(7, 40, seed=1, paired=True)
    np.testing.assert_array_equal(masks[1::2], ~masks[0::2])
    with pytest.raises(ValueError, match="even"):
        sh.sample_shapley_coalitions(7, 41, paired=True)


def test_samplers_are_deterministic_given_seed():
    np.testing.assert_array_equal(sh.sample_shapley_coalitions(6, 50, seed=4),
                                  sh.sample_shapley_coalitions(6, 50, seed=4))
    assert not np.array_equal(sh.sample_shapley_coalitions(6, 50, seed=4),
                              sh.sample_shapley_coalitions(6, 50, seed=5))
    np.testing.assert_array_equal(sh.sample_uniform_coalitions(6, 50, seed=4),
                                  sh.sample_uniform_coalitions(6, 50, seed=4))


def test_uniform_sampler_includes_each_group_half_the_time():
    masks = sh.sample_uniform_coalitions(8, 20000, seed=2)
    assert masks.shape == (20000, 8) and masks.dtype == bool
    assert np.all(np.abs(masks.mean(axis=0) - 0.5) < 0.015)
    # independence: the size is Binomial(8, 1/2)
    assert abs(masks.sum(axis=1).var() - 2.0) < 0.1


def test_loo_coalitions_drop_one_group_each():
    np.testing.assert_array_equal(sh.loo_coalitions(3), [[0, 1, 1], [1, 0, 1], [1, 1, 0]])


# ----------------------------------------------------------------------------- exact values
def test_exact_shapley_of_additive_game_is_its_weights():
    w = np.array([0.3, -1.2, 2.5, 0.0, 4.1, -0.7])
    np.testing.assert_allclose(sh.exact_shapley(additive(w, c=10.0), 6), w, atol=1e-12)
    np.testing.assert_allclose(sh.exact_banzhaf(additive(w, c=10.0), 6), w, atol=1e-12)


def test_exact_shapley_of_voting_game_matches_all_permutations():
    phi = sh.exact_shapley(VOTE5, 5)
    np.testing.assert_allclose(phi, shapley_by_permutations(VOTE5, 5), atol=1e-12)
    # hand check: the two weight-1 voters are symmetric, and the values sum to v(full) - v(empty) = 1
    assert phi[3] == pytest.approx(phi[4]) and phi.sum() == pytest.approx(1.0)


def test_exact_banzhaf_matches_definition_and_differs_from_shapley():
    ban = sh.exact_banzhaf(VOTE5, 5)
    np.testing.assert_allclose(ban, banzhaf_by_definition(VOTE5, 5), atol=1e-12)
    assert not np.allclose(ban, sh.exact_shapley(VOTE5, 5))


def test_exact_shapley_of_squared_game_matches_closed_form():
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    np.testing.assert_allclose(sh.exact_shapley(squared(w), 5), w * w.sum(), atol=1e-12)


def test_exact_shapley_accepts_dict_of_all_coalitions():
    masks = sh.all_coalitions(5)
    by_bytes = {m.tobytes(): VOTE5(m) for m in masks}
    by_tuple = {tuple(m): VOTE5(m) for m in masks}
    expected = sh.exact_shapley(VOTE5, 5)
    np.testing.assert_allclose(sh.exact_shapley(by_bytes, 5), expected, atol=1e-15)
    np.testing.assert_allclose(sh.exact_shapley(by_tuple, 5), expected, atol=1e-15)
    del by_tuple[(True, False, True, False, False)]
    with pytest.raises(ValueError, match=r"lacks 1 .*groups \[0, 2\]"):
        sh.exact_shapley(by_tuple, 5)
    with pytest.raises(ValueError, match="not a"):
        sh.exact_shapley({(True, False): 1.0}, 5)


def test_exact_shapley_refuses_large_G_before_evaluating():
    def never(mask):
        raise AssertionError("must not be called")
    with pytest.raises(ValueError, match="kernel_shap"):
        sh.exact_shapley(never, 17)
    with pytest.raises(ValueError, match="banzhaf_from_samples"):
        sh.exact_banzhaf(never, 17)


# ----------------------------------------------------------------------------- KernelSHAP
def _vote8():
    v = majority(VOTE8_W, VOTE8_Q)
    return v, sh.exact_shapley(v, 8), v(np.zeros(8, bool)), v(np.ones(8, bool))


@pytest.mark.parametrize("paired", [False, True])
def test_kernel_shap_converges_to_exact_shapley(paired):
    v, exact, v0, v1 = _vote8()
    masks = sh.sample_shapley_coalitions(8, 4096, seed=0, paired=paired)
    values = sample_values(v, masks)
    err_small = np.abs(sh.kernel_shap(masks[:64], values[:64], v0, v1) - exact).mean()
    err_large = np.abs(sh.kernel_shap(masks, values, v0, v1) - exact).mean()
    scale = abs(v1 - v0)
    assert err_large < 0.25 * err_small
    assert err_large < 0.02 * scale
    assert np.abs(sh.kernel_shap(masks, values, v0, v1) - exact).max() < 0.05 * scale


def test_kernel_shap_converges_on_squared_game():
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.2])
    v, exact = squared(w), w * w.sum()
    masks = sh.sample_shapley_coalitions(6, 4096, seed=7, paired=True)
    est = sh.kernel_shap(masks, sample_values(v, masks), 0.0, w.sum() ** 2)
    assert np.abs(est - exact).max() < 0.05 * w.sum() ** 2 / 6


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 64, 500])
def test_kernel_shap_is_exactly_efficient_for_every_m(m):
    v, _, v0, v1 = _vote8()
    masks = sh.sample_shapley_coalitions(8, m, seed=m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # small m: singular A, pinv fallback
        beta = sh.kernel_shap(masks, sample_values(v, masks), v0 + 0.25, v1 + 3.0)
    assert abs(beta.sum() - (v1 + 3.0 - v0 - 0.25)) < 1e-9


def test_kernel_shap_warns_and_stays_efficient_when_A_is_singular():
    v, _, v0, v1 = _vote8()
    masks = sh.sample_shapley_coalitions(8, 3, seed=0)
    with pytest.warns(RuntimeWarning, match="singular"):
        beta = sh.kernel_shap(masks, sample_values(v, masks), v0, v1)
    assert np.all(np.isfinite(beta)) and abs(beta.sum() - (v1 - v0)) < 1e-12


@pytest.mark.parametrize("m", [6, 12, 40])
def test_kernel_shap_is_exact_on_additive_game_once_A_has_full_rank(m):
    w = np.array([0.3, -1.2, 2.5, 0.0, 4.1, -0.7])
    v = additive(w, c=2.0)
    masks = sh.sample_shapley_coalitions(6, m, seed=2)
    assert np.linalg.matrix_rank(masks.astype(float)) == 6   # precondition for this seed
    beta = sh.kernel_shap(masks, sample_values(v, masks), 2.0, 2.0 + w.sum())
    np.testing.assert_allclose(beta, w, atol=1e-10)


def test_kernel_shap_rejects_trivial_coalitions_and_bad_shapes():
    masks = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)
    with pytest.raises(ValueError, match=r"rows \[1\].*v_empty / v_full"):
        sh.kernel_shap(masks, [1.0, 2.0], 0.0, 2.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        sh.kernel_shap(masks[:1].repeat(2, 0), [1.0], 0.0, 2.0)
    with pytest.raises(ValueError, match="0/1"):
        sh.kernel_shap([[2, 0, 1]], [1.0], 0.0, 2.0)


def test_convergence_curve_rows_are_prefix_estimates():
    v, _, v0, v1 = _vote8()
    masks = sh.sample_shapley_coalitions(8, 300, seed=5, paired=True)
    values = sample_values(v, masks)
    cps = [20, 100, 300]
    # the first 20 coalitions of this seed span only 7 directions: that checkpoint is flagged, by count
    with pytest.warns(RuntimeWarning, match=r"checkpoints \[20\]"):
        curve = sh.kernel_shap_convergence(masks, values, v0, v1, cps)
    assert curve.shape == (3, 8)
    np.testing.assert_array_equal(curve[-1], sh.kernel_shap(masks, values, v0, v1))
    with pytest.warns(RuntimeWarning, match="singular"):
        np.testing.assert_array_equal(curve[0], sh.kernel_shap(masks[:20], values[:20], v0, v1))
    np.testing.assert_allclose(curve.sum(axis=1), v1 - v0, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[301\]"):
        sh.kernel_shap_convergence(masks, values, v0, v1, [10, 301])


def test_bootstrap_interval_contains_estimate_and_is_deterministic():
    v, exact, v0, v1 = _vote8()
    masks = sh.sample_shapley_coalitions(8, 400, seed=9, paired=True)
    values = sample_values(v, masks)
    est = sh.kernel_shap(masks, values, v0, v1)
    low, high = sh.kernel_shap_bootstrap(masks, values, v0, v1, n_boot=200, seed=1)
    assert low.shape == high.shape == (8,)
    assert np.all(low < est) and np.all(est < high)
    assert np.all(high - low < 0.2)
    low2, high2 = sh.kernel_shap_bootstrap(masks, values, v0, v1, n_boot=200, seed=1)
    np.testing.assert_array_equal(low, low2)
    np.testing.assert_array_equal(high, high2)
    narrow, _ = sh.kernel_shap_bootstrap(masks, values, v0, v1, n_boot=200, seed=1, level=0.5)
    assert np.all(narrow >= low)
    with pytest.raises(ValueError, match="level"):
        sh.kernel_shap_bootstrap(masks, values, v0, v1, level=1.5)


# ----------------------------------------------------------------------------- permutation sampling
class CountingGame:
    def __init__(self, v):
        self.v, self.calls = v, []

    def __call__(self, mask):
        self.calls.append(mask.tobytes())
        return self.v(mask)


@pytest.mark.parametrize("antithetic", [False, True])
def test_permutation_shapley_converges_and_caches(antithetic):
    game = CountingGame(VOTE5)
    est, n_eval = sh.permutation_shapley(game, 5, n_permutations=2000, seed=0, antithetic=antithetic)
    np.testing.assert_allclose(est, shapley_by_permutations(VOTE5, 5), atol=0.03)
    assert n_eval == len(game.calls) == len(set(game.calls)) == 2 ** 5


@pytest.mark.parametrize("n,antithetic", [(1, False), (2, True), (3, False)])
def test_permutation_shapley_is_efficient_for_each_permutation(n, antithetic):
    w = np.array([0.4, -2.0, 1.3, 0.9, 5.5, -0.1, 0.7])
    v = squared(w)
    est, n_eval = sh.permutation_shapley(v, 7, n_permutations=n, seed=3, antithetic=antithetic)
    assert abs(est.sum() - w.sum() ** 2) < 1e-12
    assert n_eval <= n * 7 + 1


def test_permutation_shapley_antithetic_needs_even_count():
    with pytest.raises(ValueError, match="even"):
        sh.permutation_shapley(VOTE5, 5, n_permutations=3, antithetic=True)


# ----------------------------------------------------------------------------- Banzhaf from samples
def test_banzhaf_from_samples_is_msr_on_a_hand_example():
    masks = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    values = np.array([3.0, 5.0, 10.0, 1.0])
    # group 0: mean(3, 10) - mean(5, 1) = 3.5;  group 1: mean(5, 10) - mean(3, 1) = 5.5
    np.testing.assert_allclose(sh.banzhaf_from_samples(masks, values), [3.5, 5.5])
    with pytest.raises(ValueError, match=r"groups \[0\]"):
        sh.banzhaf_from_samples(masks[[0, 2]], values[[0, 2]])


def test_banzhaf_from_samples_converges_to_exact():
    v = majority(VOTE8_W, VOTE8_Q)
    exact = sh.exact_banzhaf(v, 8)
    masks = sh.sample_uniform_coalitions(8, 20000, seed=0)
    values = sample_values(v, masks)
    err_small = np.abs(sh.banzhaf_from_samples(masks[:200], values[:200]) - exact).max()
    err_large = np.abs(sh.banzhaf_from_samples(masks, values) - exact).max()
    assert err_large < 0.5 * err_small and err_large < 0.03


# ----------------------------------------------------------------------------- baselines
def test_leave_one_out_on_hand_example_and_additive_game():
    np.testing.assert_allclose(sh.leave_one_out(10.0, [7.0, 10.0, 12.5]), [3.0, 0.0, -2.5])
    w = np.array([1.0, -2.0, 0.5, 3.0])
    v = additive(w, c=1.0)
    v_without = sample_values(v, sh.loo_coalitions(4))
    np.testing.assert_allclose(sh.leave_one_out(v(np.ones(4, bool)), v_without), w, atol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        sh.leave_one_out(1.0, [np.nan, 1.0])


def test_aggregate_per_sample_hand_examples():
    scores = np.array([1.0, 2.0, -4.0, 3.0, 0.5])
    groups = np.array(["cat", "dog", "cat", "dog", "bird"])
    order = ["dog", "cat", "bird"]
    np.testing.assert_allclose(sh.aggregate_per_sample(scores, groups, order, "sum"), [5.0, -3.0, 0.5])
    np.testing.assert_allclose(sh.aggregate_per_sample(scores, groups, order, "mean"), [2.5, -1.5, 0.5])
    np.testing.assert_allclose(sh.aggregate_per_sample(scores, groups, order, "max"), [3.0, 1.0, 0.5])
    matrix = np.stack([scores, 3 * scores])          # query mean = 2 * scores
    np.testing.assert_allclose(sh.aggregate_per_sample(matrix, groups, order, "sum"), [10.0, -6.0, 1.0])
    np.testing.assert_allclose(sh.aggregate_per_sample(scores, [2, 0, 2, 0, 1], [0, 1, 2], "sum"),
                               [5.0, 0.5, -3.0])


def test_aggregate_per_sample_errors_name_the_group():
    scores, groups = np.ones(3), np.array(["a", "b", "a"])
    with pytest.raises(ValueError, match=r"\['zebra'\].*no samples"):
        sh.aggregate_per_sample(scores, groups, ["a", "b", "zebra"])
    with pytest.raises(ValueError, match=r"\['b'\].*not in group_order"):
        sh.aggregate_per_sample(scores, groups, ["a"])
    with pytest.raises(ValueError, match="how"):
        sh.aggregate_per_sample(scores, groups, ["a", "b"], how="median")
    with pytest.raises(ValueError, match="one id per sample"):
        sh.aggregate_per_sample(scores, groups[:2], ["a", "b"])
