"""Global properties F of a generative model (DESIGN 1.5): the value function of the group-attribution game.

The game is v(S) = F(theta_S). Each F here scores a fixed set of images that the model theta_S generated
from the same generator seeds as every other coalition, so differences between coalitions come from the
model, not from the noise.

Offline there are no Inception (or CLIP, or aesthetics-predictor) weights, so the image statistics are
computed on an in-domain encoder instead (``attribution/encoder.py``): its class posteriors stand in for
Inception's p(y|x) and its penultimate features for the Inception pool features. The numbers are therefore
comparable between coalitions of one run, not with published IS/FID values.

Convention: **higher is better for every property** (the Shapley value of a group is then its
contribution to "better"). That is why ``PROPERTIES["fid"]`` is the *negative* Frechet distance.

A user-supplied scorer (e.g. an aesthetics model) plugs in as ``"module.path:function"``: any callable
``fn(images, ctx) -> float``.

numpy / scipy / scikit-learn only; everything is float64 and deterministic.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg

__all__ = [
    "PROPERTIES",
    "PropertyContext",
    "build_context",
    "ReferenceClusters",
    "cluster_entropy",
    "evaluate_property",
    "fit_reference_clusters",
    "frechet_distance",
    "inception_score",
    "load_property",
    "register_property",
]

_LOG_EPS = 1e-12        # floor inside logs: a posterior of exactly 0 must not give -inf
_FD_EPS = 1e-6          # ridge added to both covariances when their product is (numerically) singular
_SQRTM_RTOL = 1e-6      # relative residual ||X X - A|| / ||A|| above which sqrtm's answer is not trusted


# ----------------------------------------------------------------------------- quality statistics
def inception_score(probs: np.ndarray) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean posterior over the images.

    High when every image is confidently one class (low conditional entropy) *and* the classes are
    spread out (high marginal entropy); ranges from 1 to C. Rows are renormalised so that softmax
    round-off cannot matter; logs are floored at 1e-12 so a zero probability contributes 0, not nan.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"inception_score needs an (m, C) array of posteriors with m, C >= 1, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("inception_score needs finite, non-negative posteriors (got logits?)")
    row = p.sum(axis=1, keepdims=True)
    if (row <= 0).any():
        raise ValueError("inception_score: some posterior rows sum to 0")
    p = p / row
    py = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(np.maximum(p, _LOG_EPS)) - np.log(np.maximum(py, _LOG_EPS)))).sum(axis=1)
    return float(np.exp(kl.mean()))


def _moments(feats: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"frechet_distance: {name} must be (n, d) with n >= 2, got {np.shape(feats)}")
    if not np.isfinite(x).all():
        raise ValueError(f"frechet_distance: {name} has non-finite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))   # unbiased (ddof=1), as pytorch-fid


def _sqrtm_trusted(mat: np.ndarray) -> np.ndarray | None:
    """scipy's sqrtm, or None when its answer cannot be trusted (an error, non-finite values, or X X far
    from the input). sqrtm's "singular" warning alone is not enough: with fewer samples than feature
    dimensions the product is always singular, and the root is usually still exact to round-off, which
    the residual check confirms; a ridge would then only add bias."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(mat)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not np.isfinite(root).all():
        return None
    scale = max(float(np.abs(mat).max()), 1e-300)
    if np.abs(root @ root - mat).max() > _SQRTM_RTOL * scale:
        return None
    return root


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the statistic behind FID):

        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Covariances are unbiased (ddof=1). The matrix square root is scipy.linalg.sqrtm. When the product
    S_a S_b is singular in a way that breaks sqrtm (it fails, returns non-finite values, or a root whose
    square is off by more than 1e-6 relative), the standard pytorch-fid remedy is applied: 1e-6 * I is
    added to *both* covariances and the root recomputed. That costs a bias of about sqrt(1e-6 * lambda)
    per null direction of the product (lambda an eigenvalue of the other covariance), which is why it is
    a fallback only: a singular product whose root sqrtm computes accurately (the usual case with fewer
    samples than dimensions) is used as is. Tiny imaginary parts of the root (round-off; the exact trace
    is real) are discarded. The result is clipped at 0, which round-off can undershoot for identical sets.
    """
    mu_a, s_a = _moments(feats_a, "feats_a")
    mu_b, s_b = _moments(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature dims differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    root = _sqrtm_trusted(s_a @ s_b)
    if root is None:
        ridge = _FD_EPS * np.eye(len(mu_a))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
        if not np.isfinite(root).all():
            raise ValueError("frechet_distance: matrix square root failed even with a ridge")
    tr_root = float(np.real(np.trace(root)))
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_root)
    return max(value, 0.0)


# ----------------------------------------------------------------------------- diversity
@dataclass
class ReferenceClusters:
    """Clusters of a reference set, fixed once per run so that every coalition is scored on the same bins.

    centroids (K, d): cluster means; labels (r,): cluster of each reference point; proportions (K,):
    share of the reference set in each cluster (sums to 1).
    """

    centroids: np.ndarray
    labels: np.ndarray
    proportions: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])


def fit_reference_clusters(ref_feats: np.ndarray, n_clusters: int = 20) -> ReferenceClusters:
    """Ward agglomerative clustering of the reference features (the Shapley paper uses 20 Ward clusters).

    Ward is deterministic (no random init), so the bins do not depend on a seed. n_clusters is capped at
    the number of reference points (the maximum diversity is then log(r) instead of log(n_clusters)).
    """
    from sklearn.cluster import AgglomerativeClustering

    x = np.asarray(ref_feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"fit_reference_clusters needs (r, d) features with r >= 1, got {x.shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    k = min(int(n_clusters), x.shape[0])
    if k == 1:
        labels = np.zeros(x.shape[0], dtype=np.int64)
    else:
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x).astype(np.int64)
    counts = np.bincount(labels, minlength=k)
    centroids = np.stack([x[labels == c].mean(axis=0) for c in range(k)])
    return ReferenceClusters(centroids=centroids, labels=labels, proportions=counts / counts.sum())


def cluster_entropy(feats: np.ndarray, clusters: ReferenceClusters) -> float:
    """Entropy (nats) of the share of generated images per reference cluster, nearest centroid (Euclidean).

    The diversity property: 0 when every image lands in one cluster (mode collapse), log(K) when they
    spread evenly over all K clusters.
    """
    x = np.asarray(feats, dtype=np.float64)
    c = np.asarray(clusters.centroids, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != c.shape[1]:
        raise ValueError(f"cluster_entropy needs (m, {c.shape[1]}) features with m >= 1, got {x.shape}")
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    counts = np.bincount(d2.argmin(axis=1), minlength=len(c))
    p = counts[counts > 0] / x.shape[0]
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- properties and registry
@dataclass(frozen=True)
class PropertyContext:
    """What a property needs besides the images: the in-domain encoder (as two closures over it) and the
    reference statistics. Built once per run and shared by every coalition.

    clusters may be None: "diversity" then fits them from reference_feats on each call (Ward is
    deterministic, so the value is the same, only slower).
    """

    embed: Callable[[np.ndarray], np.ndarray]
    predict_proba: Callable[[np.ndarray], np.ndarray]
    reference_feats: np.ndarray
    clusters: ReferenceClusters | None = None


def build_context(embed: Callable[[np.ndarray], np.ndarray], predict_proba: Callable[[np.ndarray], np.ndarray],
                  reference_images: np.ndarray, n_clusters: int = 20) -> PropertyContext:
    """The context every coalition of a run shares: reference features and their clusters, computed once."""
    feats = embed(reference_images)
    return PropertyContext(embed=embed, predict_proba=predict_proba, reference_feats=feats,
                           clusters=fit_reference_clusters(feats, n_clusters))


def _inception_score_property(images: np.ndarray, ctx: PropertyContext) -> float:
    """Quality + class coverage: IS on the in-domain classifier's posteriors."""
    return inception_score(ctx.predict_proba(images))


def _fid_property(images: np.ndarray, ctx: PropertyContext) -> float:
    """NEGATIVE Frechet distance to the reference features, so that higher = closer to the data."""
    return -frechet_distance(ctx.embed(images), ctx.reference_feats)


def _diversity_property(images: np.ndarray, ctx: PropertyContext) -> float:
    """Entropy of the generated images over the reference clusters."""
    clusters = ctx.clusters if ctx.clusters is not None else fit_reference_clusters(ctx.reference_feats)
    return cluster_entropy(ctx.embed(images), clusters)


def _mean_confidence_property(images: np.ndarray, ctx: PropertyContext) -> float:
    """Mean max posterior: a cheap quality proxy (recognisable images are classified confidently)."""
    return float(np.asarray(ctx.predict_proba(images), dtype=np.float64).max(axis=1).mean())


PROPERTIES: dict[str, Callable[[np.ndarray, PropertyContext], float]] = {
    "inception_score": _inception_score_property,
    "fid": _fid_property,
    "diversity": _diversity_property,
    "mean_confidence": _mean_confidence_property,
}


def register_property(name: str, fn: Callable[[np.ndarray, PropertyContext], float], *,
                      overwrite: bool = False) -> None:
    """Add a named property ``fn(images, ctx) -> float`` (higher = better). Re-registering the same
    function is a no-op; replacing a different one needs overwrite=True, so a built-in cannot be
    shadowed by accident."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"property name must be a non-empty string without ':', got {name!r}")
    if not callable(fn):
        raise ValueError(f"property {name!r}: {fn!r} is not callable")
    if name in PROPERTIES and PROPERTIES[name] is not fn and not overwrite:
        raise ValueError(f"property {name!r} is already registered (pass overwrite=True to replace it)")
    PROPERTIES[name] = fn


def _known() -> str:
    return ", ".join(sorted(PROPERTIES))


def load_property(spec: str) -> Callable[[np.ndarray, PropertyContext], float]:
    """A registered name, or ``"module.path:function"`` (dotted attributes allowed after the colon) for a
    user-supplied scorer such as an aesthetics model. Anything unresolvable is a ValueError naming the
    spec and the known names, so a typo in an experiment file fails before any training."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"property spec must be a non-empty string, got {spec!r}; known: {_known()}")
    if spec in PROPERTIES:
        return PROPERTIES[spec]
    if ":" not in spec:
        raise ValueError(f"unknown property {spec!r}; known: {_known()} (or 'module.path:function')")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"property spec {spec!r} must look like 'module.path:function'; known: {_known()}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also errors raised while the user's module runs
        raise ValueError(f"property {spec!r}: cannot import {module_name!r} ({exc!r}); known: {_known()}") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"property {spec!r}: {module_name!r} has no attribute {attr!r}; known: {_known()}") from exc
    if not callable(obj):
        raise ValueError(f"property {spec!r} is not callable; known: {_known()}")
    return obj


def evaluate_property(name_or_spec: str, images: np.ndarray, ctx: PropertyContext) -> float:
    """F(images) as a float. A non-finite value is an error: one nan would poison every Shapley value."""
    value = float(load_property(name_or_spec)(images, ctx))
    if not math.isfinite(value):
        raise ValueError(f"property {name_or_spec!r} returned a non-finite value ({value})")
    return value
