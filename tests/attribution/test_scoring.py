"""Scorers, TracIn/ReTrac and influence statistics, each checked against an independent computation."""
import json
import math

import numpy as np
import pytest

from attribution import influence_stats as ist
from attribution import scoring as sc
from attribution.tracin import average_query_grads, tracin_scores


def _feats(n, k, m, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)), rng.normal(size=(m, k))


def _ref_kernel(phi, phi_z, lam):
    """Direct textbook formula with an explicit inverse (the implementation uses Cholesky solves)."""
    return phi_z @ np.linalg.inv(phi.T @ phi + lam * np.eye(phi.shape[1])) @ phi.T


def _close(actual, expected, rtol=1e-8):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3 * np.abs(expected).max())


# ----------------------------------------------------------------------------- kernel scores
@pytest.mark.parametrize("n,k", [(6, 10), (12, 5)])
@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_kernel_scores_match_inverse_formula(n, k, form):
    phi, phi_z = _feats(n, k, 3)
    lam = 0.7
    tau = sc.kernel_scores(phi, phi_z, lam, form=form)
    assert tau.shape == (3, n) and tau.dtype == np.float64
    _close(tau, _ref_kernel(phi, phi_z, lam))


def test_auto_picks_dual_iff_n_below_k(monkeypatch):
    assert sc.resolve_form("auto", 6, 10) == "dual"
    assert sc.resolve_form("auto", 12, 5) == "primal"
    assert sc.resolve_form("auto", 5, 5) == "primal"
    calls = []
    for name in ("_primal_weights", "_dual_weights"):
        real = getattr(sc, name)
        monkeypatch.setattr(sc, name, lambda phi, lam, _r=real, _n=name: calls.append(_n) or _r(phi, lam))
    sc.kernel_scores(*_feats(6, 10, 2), 1.0)
    sc.kernel_scores(*_feats(12, 5, 2), 1.0)
    assert calls == ["_dual_weights", "_primal_weights"]
    with pytest.raises(ValueError, match="form"):
        sc.kernel_scores(*_feats(4, 3, 1), 1.0, form="qr")


def test_streaming_kernel_scorer_matches_kernel_scores():
    phi, phi_z = _feats(11, 4, 3, seed=1)
    lam = 0.3
    shards = [phi[:2], phi[2:7], phi[7:]]  # uneven
    ks = sc.KernelScorer(lam)
    for s in shards:
        ks.accumulate(s)
    ks.finalize()
    w = ks.query_weights(phi_z)
    _close(w, phi_z @ np.linalg.inv(phi.T @ phi + lam * np.eye(4)))
    streamed = np.concatenate([ks.score_shard(s) for s in shards], axis=1)
    _close(streamed, sc.kernel_scores(phi, phi_z, lam, form="primal"))
    _close(streamed, _ref_kernel(phi, phi_z, lam))
    assert ks.n_seen == 11
    assert ks.lambda_scale == pytest.approx(np.mean(np.diag(phi.T @ phi)))
    # re-finalising with another lam sweeps the grid without re-reading shards
    ks.finalize(lam=2.0)
    ks.query_weights(phi_z)
    _close(ks.score_shard(phi), _ref_kernel(phi, phi_z, 2.0))


def test_lam_zero_singular_raises_and_lam_none_raises():
    phi, phi_z = _feats(3, 6, 2)  # rank 3 < k = 6: Phi^T Phi is singular
    with pytest.raises(ValueError, match="lam > 0"):
        sc.kernel_scores(phi, phi_z, 0.0, form="primal")
    dup = np.vstack([phi, phi[:1]])  # duplicated row: Phi Phi^T is singular
    with pytest.raises(ValueError, match="lam > 0"):
        sc.kernel_scores(dup, phi_z, 0.0, form="dual")
    with pytest.raises(ValueError, match="lam > 0"):
        sc.KernelScorer(0.0).accumulate(phi).finalize()
    with pytest.raises(ValueError, match="explicit lam"):
        sc.kernel_scores(phi, phi_z)
    # well-posed lam = 0 (n > k, full column rank) is allowed: plain least squares
    phi2, phi2_z = _feats(9, 3, 2)
    _close(sc.kernel_scores(phi2, phi2_z, 0.0), _ref_kernel(phi2, phi2_z, 0.0))


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_relative_and_renormalized_if(form):
    phi, phi_z = _feats(5, 8, 3, seed=2)
    lam = 0.5
    inv = np.linalg.inv(phi.T @ phi + lam * np.eye(8))
    tau = phi_z @ inv @ phi.T
    rel_norm = np.array([np.linalg.norm(inv @ phi[i]) for i in range(5)])
    _close(sc.relative_if(phi, phi_z, lam, form=form), tau / rel_norm[None, :])
    _close(sc.renormalized_if(phi, phi_z, lam, form=form), tau / np.linalg.norm(phi, axis=1)[None, :])


def test_grad_dot_and_grad_cos_with_zero_rows():
    phi, phi_z = _feats(4, 3, 3, seed=3)
    phi[2] = 0.0
    phi_z[1] = 0.0
    _close(sc.grad_dot(phi, phi_z), np.einsum("mk,nk->mn", phi_z, phi))
    cos = sc.grad_cos(phi, phi_z)
    assert np.all(np.isfinite(cos))
    for a in range(3):
        for i in range(4):
            na, ni = math.sqrt(phi_z[a] @ phi_z[a]), math.sqrt(phi[i] @ phi[i])
            expected = 0.0 if na == 0 or ni == 0 else (phi_z[a] @ phi[i]) / (na * ni)
            assert cos[a, i] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_registry_common_signature():
    phi, phi_z = _feats(6, 4, 2)
    assert set(sc.SCORERS) == {"kernel", "grad_dot", "grad_cos", "relative_if", "renormalized_if"}
    for name, fn in sc.SCORERS.items():
        assert fn(phi, phi_z, lam=0.1).shape == (2, 6), name
    _close(sc.SCORERS["kernel"](phi, phi_z, lam=0.1), _ref_kernel(phi, phi_z, 0.1))


def test_ensemble_mean_and_shape_check():
    rng = np.random.default_rng(4)
    a, b, c = (rng.normal(size=(2, 5)) for _ in range(3))
    _close(sc.ensemble([a, b, c]), (a + b + c) / 3)
    with pytest.raises(ValueError, match="shape"):
        sc.ensemble([a, rng.normal(size=(2, 4))])
    with pytest.raises(ValueError):
        sc.ensemble([])


def test_lambda_scale_and_grid():
    phi, _ = _feats(7, 5, 1)
    scale = np.mean(np.diag(phi.T @ phi))
    assert sc.lambda_scale(phi) == pytest.approx(scale, rel=1e-12)
    _close(sc.lambda_grid(phi, factors=(0.01, 0.1)), scale * np.array([0.01, 0.1]))
    assert sc.lambda_grid(phi).shape == (5,)


def test_similarity_scores_rank_planted_duplicate_first():
    rng = np.random.default_rng(5)
    train = rng.uniform(size=(20, 1, 8, 8))
    train[3] *= 4.0  # a bright image: wins under the raw dot product, must not under cosine / neg_l2
    query = np.stack([train[11].copy(), rng.uniform(size=(1, 8, 8))])
    for kind in ("cosine", "neg_l2"):
        assert int(np.argmax(sc.similarity_scores(train, query, kind)[0])) == 11, kind
    x, z = train.reshape(20, -1), query.reshape(2, -1)
    neg_l2 = sc.similarity_scores(train, query, "neg_l2")
    assert neg_l2[0, 11] == 0.0
    _close(neg_l2, -np.sqrt(((z[:, None, :] - x[None, :, :]) ** 2).sum(-1)))
    _close(sc.similarity_scores(train, query, "dot"), z @ x.T)
    with pytest.raises(ValueError, match="kind"):
        sc.similarity_scores(train, query, "l1")


# ----------------------------------------------------------------------------- TracIn / ReTrac
# 3 train samples, 2 queries, d = 2, 2 checkpoints with lr weights w = (0.1, 0.05).
_G_TRAIN = [np.array([[1, 0], [0, 2], [3, 4]]), np.array([[2, 1], [1, -1], [0, 0]])]
_G_QUERY = [np.array([[1, 1], [0, 1]]), np.array([[2, 0], [0, 1]])]
_W = (0.1, 0.05)


def test_tracin_hand_computation():
    # query 0: c1 dots (1, 2, 7), c2 dots (4, 2, 0) -> 0.1*(1,2,7) + 0.05*(4,2,0)
    # query 1: c1 dots (0, 2, 4), c2 dots (1, -1, 0) -> 0.1*(0,2,4) + 0.05*(1,-1,0)
    expected = np.array([[0.3, 0.3, 0.7], [0.05, 0.15, 0.4]])
    _close(tracin_scores(_G_TRAIN, _G_QUERY, _W), expected, rtol=1e-12)


def test_retrac_hand_computation():
    # unit train rows: c1 (1,0), (0,1), (0.6,0.8); c2 (2,1)/sqrt5, (1,-1)/sqrt2, zero row -> 0
    r5, r2 = math.sqrt(5), math.sqrt(2)
    expected = np.array([
        [0.1 * 1 + 0.05 * 4 / r5, 0.1 * 1 + 0.05 * 2 / r2, 0.1 * 1.4 + 0.0],
        [0.1 * 0 + 0.05 * 1 / r5, 0.1 * 1 + 0.05 * -1 / r2, 0.1 * 0.8 + 0.0],
    ])
    _close(tracin_scores(_G_TRAIN, _G_QUERY, _W, renormalize=True), expected, rtol=1e-12)


def test_retrac_invariant_to_train_row_scaling():
    rng = np.random.default_rng(6)
    g_train = [rng.normal(size=(5, 4)) for _ in range(3)]
    g_query = [rng.normal(size=(2, 4)) for _ in range(3)]
    w = [0.3, 0.2, 0.1]
    scaled = [g.copy() for g in g_train]
    scaled[1][2] *= 7.3
    _close(tracin_scores(scaled, g_query, w, renormalize=True),
           tracin_scores(g_train, g_query, w, renormalize=True), rtol=1e-12)
    plain, plain_scaled = tracin_scores(g_train, g_query, w), tracin_scores(scaled, g_query, w)
    assert not np.allclose(plain[:, 2], plain_scaled[:, 2])  # TracIn itself is not invariant
    with pytest.raises(ValueError, match="checkpoint counts"):
        tracin_scores(g_train, g_query, w[:2])


def test_average_query_grads():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(2, 3, 4))
    g[1, 0] = 0.0  # a zero gradient contributes zero, not NaN
    _close(average_query_grads(g, normalize=False), g.mean(axis=1))
    expected = np.zeros((2, 4))
    for a in range(2):
        for t in range(3):
            nrm = np.linalg.norm(g[a, t])
            expected[a] += (g[a, t] / nrm if nrm > 0 else 0.0) / 3
    _close(average_query_grads(g, normalize=True), expected)


# ----------------------------------------------------------------------------- influence statistics
_S = np.array([
    [9, 1, 5, 5, 0],
    [9, 3, 2, 8, 1],
    [9, 7, 7, 0, 2],
    [9, 0, 6, 4, 1],
])  # column 0 is every query's top proponent


def test_top_k_ties_go_to_lower_index():
    np.testing.assert_array_equal(ist.top_k(_S, 2), [[0, 2], [0, 3], [0, 1], [0, 2]])
    np.testing.assert_array_equal(ist.top_k(_S, 1, largest=False), [[4], [4], [3], [1]])
    np.testing.assert_array_equal(ist.top_k(np.zeros((2, 4)), 3), [[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="k must be"):
        ist.top_k(_S, 6)


def test_unique_frequency_and_summary():
    assert ist.unique_in_top_k(_S, 2) == 4  # {0, 1, 2, 3}
    np.testing.assert_allclose(ist.top_k_frequency(_S, 2), [1.0, 0.25, 0.5, 0.25, 0.0])
    summary = ist.influence_summary(_S, 2)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["unique"] == 4 and summary["slots"] == 8 and summary["max_frequency"] == 1.0
    assert summary["most_frequent"] == [
        {"train_id": 0, "frequency": 1.0},
        {"train_id": 2, "frequency": 0.5},
        {"train_id": 1, "frequency": 0.25},
        {"train_id": 3, "frequency": 0.25},
    ]
