"""Global properties F (DESIGN 1.5), each checked against an independent computation."""
import math
import sys
import uuid

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from attribution import properties as pr


# ----------------------------------------------------------------------------- helpers
def with_exact_moments(rng, n, mean, cov):
    """n points whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    d = len(mean)
    z = rng.normal(size=(n, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # sample cov = I
    return np.asarray(mean) + z @ np.linalg.cholesky(cov).T


def fd_by_eigen(mu_a, s_a, mu_b, s_b):
    """Tr((S_a S_b)^1/2) = Tr((A^1/2 S_b A^1/2)^1/2): symmetric eigen-decompositions, no sqrtm."""
    w, v = np.linalg.eigh(s_a)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(ra @ s_b @ ra)
    tr_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_root)


def flat(images):
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- inception score
def test_inception_score_uniform_identical_posteriors_is_one():
    assert pr.inception_score(np.full((7, 5), 0.2)) == pytest.approx(1.0, abs=1e-12)
    # identical (non-uniform) posteriors: p(y|x) = p(y), KL = 0
    assert pr.inception_score(np.tile([0.7, 0.2, 0.1], (4, 1))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("C, per_class", [(2, 1), (5, 3), (10, 4)])
def test_inception_score_one_hot_spread_evenly_is_C(C, per_class):
    probs = np.repeat(np.eye(C), per_class, axis=0)
    assert pr.inception_score(probs) == pytest.approx(C, rel=1e-9)


def test_inception_score_hand_computed_2x2():
    probs = np.array([[0.9, 0.1], [0.5, 0.5]])       # p(y) = [0.7, 0.3]
    kl1 = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    kl2 = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert pr.inception_score(probs) == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)


def test_inception_score_validates_input():
    with pytest.raises(ValueError):
        pr.inception_score(np.array([[-1.0, 2.0]]))       # logits, not probabilities
    with pytest.raises(ValueError):
        pr.inception_score(np.zeros((0, 3)))


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert pr.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    va, vb = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = with_exact_moments(rng, 300, mu_a, np.diag(va))
    b = with_exact_moments(rng, 150, mu_b, np.diag(vb))
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert pr.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_large_samples_approach_closed_form():
    rng = np.random.default_rng(2)
    mu_a, mu_b, va, vb = np.zeros(3), np.array([1.0, 0.0, 2.0]), np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])
    a = mu_a + rng.normal(size=(40000, 3)) * np.sqrt(va)
    b = mu_b + rng.normal(size=(40000, 3)) * np.sqrt(vb)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert pr.frechet_distance(a, b) == pytest.approx(expected, abs=0.1)


def test_frechet_full_covariance_matches_eigen_formula_and_is_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(80, 5)) @ rng.normal(size=(5, 5)) + 1.0
    b = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    ref = fd_by_eigen(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert pr.frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    assert pr.frechet_distance(a, b) == pytest.approx(pr.frechet_distance(b, a), rel=1e-9)


def test_frechet_singular_covariances_stay_finite_and_close():
    """Fewer points than dimensions and a constant feature: both covariances singular."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(7, 10)) + 0.5
    a[:, 0] = b[:, 0] = 3.0
    got = pr.frechet_distance(a, b)
    ref = fd_by_eigen(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(ref, rel=1e-7)      # accurate sqrtm of a singular product: no ridge bias
    z = np.zeros((5, 3))
    assert pr.frechet_distance(z, z + 1.0) == pytest.approx(3.0, abs=1e-4)   # both covariances 0


def test_frechet_ridge_fallback_when_sqrtm_untrusted(monkeypatch):
    """When sqrtm's root is rejected, eps*I is added to both covariances before recomputing."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * 2.0
    monkeypatch.setattr(pr, "_sqrtm_trusted", lambda mat: None)
    sa, sb, ridge = np.cov(a, rowvar=False), np.cov(b, rowvar=False), pr._FD_EPS * np.eye(4)
    tr_root = np.sqrt(np.clip(np.linalg.eigvals((sa + ridge) @ (sb + ridge)).real, 0, None)).sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_root
    assert pr.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


def test_frechet_rejects_mismatched_or_too_few():
    with pytest.raises(ValueError):
        pr.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        pr.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------- clusters / diversity
@pytest.fixture(scope="module")
def blobs():
    K = 5
    ref, y = make_blobs(n_samples=K * 30, centers=K, n_features=4, cluster_std=0.3,
                        center_box=(-20, 20), random_state=0)
    centers = np.stack([ref[y == k].mean(0) for k in range(K)])
    return K, ref, y, centers


def test_fit_reference_clusters_recovers_blobs(blobs):
    K, ref, y, _ = blobs
    cl = pr.fit_reference_clusters(ref, n_clusters=K)
    assert cl.centroids.shape == (K, ref.shape[1]) and cl.labels.shape == (len(ref),)
    assert adjusted_rand_score(y, cl.labels) == pytest.approx(1.0)
    assert cl.proportions.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(cl.proportions, np.bincount(cl.labels, minlength=K) / len(ref))
    for k in range(K):
        np.testing.assert_allclose(cl.centroids[k], ref[cl.labels == k].mean(0))


def test_cluster_entropy_balanced_is_log_K_and_one_blob_is_zero(blobs):
    K, ref, _, centers = blobs
    cl = pr.fit_reference_clusters(ref, n_clusters=K)
    gen, gy = make_blobs(n_samples=[40] * K, centers=centers, cluster_std=0.3, random_state=1)
    assert pr.cluster_entropy(gen, cl) == pytest.approx(math.log(K), abs=1e-12)
    assert pr.cluster_entropy(gen[gy == 2], cl) == pytest.approx(0.0, abs=1e-12)
    # two blobs in a 3:1 ratio: independent entropy
    mix = np.concatenate([gen[gy == 0][:30], gen[gy == 1][:10]])
    assert pr.cluster_entropy(mix, cl) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_fit_reference_clusters_caps_n_clusters():
    cl = pr.fit_reference_clusters(np.arange(8.0).reshape(4, 2), n_clusters=20)
    assert cl.n_clusters == 4 and cl.proportions.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def ctx_and_images():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 3))
    embed = flat
    predict_proba = lambda im: softmax(3 * flat(im) @ w)   # noqa: E731
    ref_images = rng.normal(size=(60, 1, 4, 4))
    ref = embed(ref_images)
    ctx = pr.PropertyContext(embed=embed, predict_proba=predict_proba, reference_feats=ref,
                             clusters=pr.fit_reference_clusters(ref, n_clusters=4))
    return ctx, rng.normal(size=(40, 1, 4, 4))


def test_builtin_properties_match_their_definitions(ctx_and_images):
    ctx, images = ctx_and_images
    assert {"inception_score", "fid", "diversity", "mean_confidence"} <= set(pr.PROPERTIES)
    p = ctx.predict_proba(images)
    assert pr.evaluate_property("inception_score", images, ctx) == pytest.approx(pr.inception_score(p))
    assert pr.evaluate_property("mean_confidence", images, ctx) == pytest.approx(p.max(1).mean())
    assert pr.evaluate_property("fid", images, ctx) == pytest.approx(
        -pr.frechet_distance(flat(images), ctx.reference_feats))
    div = pr.evaluate_property("diversity", images, ctx)
    assert div == pytest.approx(pr.cluster_entropy(flat(images), ctx.clusters))
    assert 0 <= div <= math.log(4) + 1e-12
    lazy = pr.PropertyContext(ctx.embed, ctx.predict_proba, ctx.reference_feats, clusters=None)
    assert pr.evaluate_property("diversity", images, lazy) == pytest.approx(
        pr.cluster_entropy(flat(images), pr.fit_reference_clusters(ctx.reference_feats)))


def test_fid_property_is_higher_for_a_better_match(ctx_and_images):
    ctx, images = ctx_and_images
    close = images + 0.05
    far = 3.0 * images + 2.0
    assert pr.evaluate_property("fid", close, ctx) <= 0
    assert pr.evaluate_property("fid", close, ctx) > pr.evaluate_property("fid", far, ctx)


def test_load_user_property_from_module(tmp_path, monkeypatch, ctx_and_images):
    ctx, images = ctx_and_images
    mod = f"user_scorer_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(
        "import numpy as np\n"
        "def brightness(images, ctx):\n    return float(np.mean(images))\n"
        "class Holder:\n    @staticmethod\n    def nan(images, ctx):\n        return float('nan')\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        fn = pr.load_property(f"{mod}:brightness")
        assert fn(images, ctx) == pytest.approx(images.mean())
        assert pr.evaluate_property(f"{mod}:brightness", images, ctx) == pytest.approx(images.mean())
        assert pr.load_property("math:fsum") is math.fsum
        with pytest.raises(ValueError, match="non-finite"):
            pr.evaluate_property(f"{mod}:Holder.nan", images, ctx)
        with pytest.raises(ValueError, match="not callable"):
            pr.load_property(f"{mod}:NOT_CALLABLE")
    finally:
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("spec", ["nope", "no_such_module_xyz_123:f", "math:no_such_function", ":f", "math:", ""])
def test_bad_specs_raise_value_error_naming_them(spec):
    with pytest.raises(ValueError) as err:
        pr.load_property(spec)
    assert repr(spec) in str(err.value) or spec in str(err.value)
    assert "fid" in str(err.value) and "diversity" in str(err.value)


def test_register_property(ctx_and_images):
    ctx, images = ctx_and_images
    name = f"test_prop_{uuid.uuid4().hex[:8]}"

    def n_images(im, c):
        return float(len(im))

    try:
        pr.register_property(name, n_images)
        pr.register_property(name, n_images)                       # same function: no-op
        assert pr.evaluate_property(name, images, ctx) == len(images)
        with pytest.raises(ValueError):
            pr.register_property(name, lambda im, c: 0.0)          # different function, no overwrite
        pr.register_property(name, lambda im, c: 1.0, overwrite=True)
        assert pr.evaluate_property(name, images, ctx) == 1.0
        with pytest.raises(ValueError):
            pr.register_property("fid", n_images)                  # built-ins are protected
        with pytest.raises(ValueError):
            pr.register_property("bad:name", n_images)
    finally:
        pr.PROPERTIES.pop(name, None)
