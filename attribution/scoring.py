"""Scorers on feature matrices (DESIGN 1.1, 1.4).

Conventions: train features ``Phi`` are (n, k), query features ``Phi_z`` are (m, k) and every
score matrix is (m, n) -- one row per query, one column per training sample. All arithmetic is
float64 whatever the input dtype, because the kernel solves are ill-conditioned near the
interpolation regime (k ~ n, small lam).

The TRAK/D-TRAK kernel score is tau = Phi_z (Phi^T Phi + lam I)^-1 Phi^T. Both forms below build the
(k, n) "train weights" matrix M = (Phi^T Phi + lam I)^-1 Phi^T, so tau = Phi_z M and the
relative-IF normaliser ||(Phi^T Phi + lam I)^-1 phi(x_i)|| is simply the norm of column i of M.
The dual form uses the push-through identity M = Phi^T (Phi Phi^T + lam I)^-1, which needs an
n x n solve instead of k x k and is cheaper when n < k.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.spatial.distance import cdist

__all__ = [
    "SCORERS",
    "KernelScorer",
    "ensemble",
    "grad_cos",
    "grad_dot",
    "kernel_scores",
    "kernel_train_weights",
    "lambda_grid",
    "lambda_scale",
    "similarity_scores",
    "relative_if",
    "renormalized_if",
    "resolve_form",
    "unit_rows",
]

_FORMS = ("auto", "primal", "dual")


# --------------------------------------------------------------------------- helpers
def _as_f64(a, name: str, ndim: int = 2) -> np.ndarray:
    """float64 array (no copy if already float64); wrong rank or NaN/inf fails early, by name."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _pair(train, query) -> tuple[np.ndarray, np.ndarray]:
    phi, phi_z = _as_f64(train, "train"), _as_f64(query, "query")
    if phi.shape[1] != phi_z.shape[1]:
        raise ValueError(f"feature dims differ: train k={phi.shape[1]}, query k={phi_z.shape[1]}")
    return phi, phi_z


def _norms(x: np.ndarray, axis: int) -> np.ndarray:
    return np.linalg.norm(x, axis=axis)


def _safe_div(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x / d elementwise (broadcast), with 0 wherever d == 0 -- a zero vector scores 0, never NaN."""
    return np.divide(x, d, out=np.zeros(np.broadcast_shapes(x.shape, d.shape)), where=d != 0)


def unit_rows(x) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero (they carry no direction)."""
    x = np.asarray(x, dtype=np.float64)
    return _safe_div(x, _norms(x, axis=1)[:, None])


def _check_lam(lam) -> float:
    if lam is None:
        raise ValueError(
            "kernel scorers need an explicit lam; choose it on held-out targets, "
            "e.g. from lambda_grid(train) (DESIGN 1.1)"
        )
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    return lam


def _cholesky(gram: np.ndarray, lam: float):
    """Cholesky factor of gram + lam I; a (numerically) singular system raises a ValueError.

    cho_factor does not always fail on a rank-deficient PSD matrix (round-off can leave tiny positive
    pivots), so the factor's diagonal is also checked: cond >= (max/min pivot)^2.
    """
    dim = gram.shape[0]
    a = gram + lam * np.eye(dim)
    hint = (f"the kernel system ({dim}x{dim}, lam={lam:g}) is singular; use lam > 0, "
            "e.g. 0.01-0.1 x lambda_scale(train)")
    try:
        c, low = cho_factor(a, lower=True, check_finite=False)
    except np.linalg.LinAlgError as exc:
        raise ValueError(hint) from exc
    piv = np.abs(np.diag(c))
    if piv.min() == 0 or (piv.min() / piv.max()) ** 2 < dim * np.finfo(np.float64).eps:
        raise ValueError(hint)
    return c, low


# --------------------------------------------------------------------------- kernel (TRAK / D-TRAK)
def resolve_form(form: str, n: int, k: int) -> str:
    """'auto' -> 'dual' when n < k (n x n solve is cheaper), else 'primal'."""
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if form == "auto":
        return "dual" if n < k else "primal"
    return form


def kernel_train_weights(train, lam, form: str = "auto") -> np.ndarray:
    """M = (Phi^T Phi + lam I)^-1 Phi^T, shape (k, n): tau = Phi_z M for any query set."""
    phi = _as_f64(train, "train")
    lam = _check_lam(lam)
    n, k = phi.shape
    if resolve_form(form, n, k) == "primal":
        return _primal_weights(phi, lam)
    return _dual_weights(phi, lam)


def _primal_weights(phi: np.ndarray, lam: float) -> np.ndarray:
    return cho_solve(_cholesky(phi.T @ phi, lam), phi.T, check_finite=False)


def _dual_weights(phi: np.ndarray, lam: float) -> np.ndarray:
    # Phi^T (Phi Phi^T + lam I)^-1 = ((Phi Phi^T + lam I)^-1 Phi)^T since the n x n matrix is symmetric.
    return cho_solve(_cholesky(phi @ phi.T, lam), phi, check_finite=False).T


def kernel_scores(train, query, lam=None, form: str = "auto") -> np.ndarray:
    """TRAK / D-TRAK score tau = Phi_z (Phi^T Phi + lam I)^-1 Phi^T, (m, n).

    TRAK and D-TRAK differ only in the output function the features were built with, not here.
    """
    phi, phi_z = _pair(train, query)
    return phi_z @ kernel_train_weights(phi, lam, form)


def relative_if(train, query, lam=None, form: str = "auto") -> np.ndarray:
    """tau divided by ||(Phi^T Phi + lam I)^-1 phi(x_i)|| per train column (RelatIF-style).

    Damps training samples that are influential on everything because of an outlying feature.
    """
    phi, phi_z = _pair(train, query)
    m_w = kernel_train_weights(phi, lam, form)
    return _safe_div(phi_z @ m_w, _norms(m_w, axis=0)[None, :])


def renormalized_if(train, query, lam=None, form: str = "auto") -> np.ndarray:
    """tau divided by ||phi(x_i)|| per train column: removes the train-gradient-norm effect."""
    phi, phi_z = _pair(train, query)
    return _safe_div(phi_z @ kernel_train_weights(phi, lam, form), _norms(phi, axis=1)[None, :])


def grad_dot(train, query, lam=None) -> np.ndarray:
    """Phi_z Phi^T (no kernel; lam is accepted for a common signature and ignored)."""
    phi, phi_z = _pair(train, query)
    return phi_z @ phi.T


def grad_cos(train, query, lam=None) -> np.ndarray:
    """Cosine similarity of features; a zero-norm row on either side scores 0."""
    phi, phi_z = _pair(train, query)
    return unit_rows(phi_z) @ unit_rows(phi).T


SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "kernel": kernel_scores,
    "grad_dot": grad_dot,
    "grad_cos": grad_cos,
    "relative_if": relative_if,
    "renormalized_if": renormalized_if,
}
"""Scorer name -> fn(train, query, lam=None) -> (m, n). Kernel-based ones require lam."""


class KernelScorer:
    """Streaming primal kernel scores for n too large for memory: O(k^2 + m k), never n x n.

    Usage: ``accumulate`` every train shard (Phi_s^T Phi_s summed into a float64 k x k Gram),
    ``finalize`` (Cholesky of G + lam I; may be called again with another lam to sweep a grid
    without re-reading the shards), ``query_weights`` once, then ``score_shard`` per train shard;
    concatenating the shard scores along axis 1 equals ``kernel_scores(..., form="primal")``.
    """

    def __init__(self, lam=None):
        self.lam = lam
        self.gram: np.ndarray | None = None
        self.n_seen = 0
        self._factor = None
        self.weights: np.ndarray | None = None

    def accumulate(self, train_shard) -> "KernelScorer":
        shard = _as_f64(train_shard, "train_shard")
        if self.gram is None:
            self.gram = np.zeros((shard.shape[1], shard.shape[1]))
        elif shard.shape[1] != self.gram.shape[0]:
            raise ValueError(f"shard has k={shard.shape[1]}, expected {self.gram.shape[0]}")
        self.gram += shard.T @ shard
        self.n_seen += shard.shape[0]
        self._factor = None  # a new shard invalidates any earlier factorisation
        self.weights = None
        return self

    @property
    def lambda_scale(self) -> float:
        """mean(diag(Phi^T Phi)) of everything accumulated so far; see :func:`lambda_scale`."""
        if self.gram is None:
            raise ValueError("no shards accumulated")
        return float(np.mean(np.diag(self.gram)))

    def finalize(self, lam=None) -> "KernelScorer":
        if self.gram is None:
            raise ValueError("finalize() before any accumulate()")
        if lam is not None:
            self.lam = lam
        self._factor = _cholesky(self.gram, _check_lam(self.lam))
        self.weights = None
        return self

    def query_weights(self, query) -> np.ndarray:
        """Phi_z (G + lam I)^-1, (m, k); kept for the following score_shard calls."""
        if self._factor is None:
            raise ValueError("call finalize() before query_weights()")
        phi_z = _as_f64(query, "query")
        if phi_z.shape[1] != self.gram.shape[0]:
            raise ValueError(f"query has k={phi_z.shape[1]}, expected {self.gram.shape[0]}")
        self.weights = cho_solve(self._factor, phi_z.T, check_finite=False).T
        return self.weights

    def score_shard(self, train_shard) -> np.ndarray:
        """Scores of the stored queries against one train shard, (m, rows)."""
        if self.weights is None:
            raise ValueError("call query_weights(query) before score_shard()")
        return self.weights @ _as_f64(train_shard, "train_shard").T


# --------------------------------------------------------------------------- lambda, ensembles
def lambda_scale(train) -> float:
    """mean(diag(Phi^T Phi)) = ||Phi||_F^2 / k: the natural unit for lam.

    DESIGN 2: lam ~ 0.01-0.1 x this removed the interpolation spike at k ~ n. The papers' absolute
    lam values (1e0...5e3) only transfer between feature sets through such a scale.
    """
    phi = _as_f64(train, "train")
    return float(np.einsum("ij,ij->", phi, phi) / phi.shape[1])


def lambda_grid(train, factors: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> np.ndarray:
    """Candidate lam values: factors x lambda_scale(train). Pick among them on held-out targets."""
    return lambda_scale(train) * np.asarray(factors, dtype=np.float64)


def ensemble(score_list: Sequence) -> np.ndarray:
    """Mean of score matrices from independently trained models (DESIGN 1.1 ensembling)."""
    mats = [np.asarray(s, dtype=np.float64) for s in score_list]
    if not mats:
        raise ValueError("ensemble() needs at least one score matrix")
    shapes = {s.shape for s in mats}
    if len(shapes) != 1:
        raise ValueError(f"score matrices differ in shape: {sorted(shapes)}")
    return np.mean(mats, axis=0)


# --------------------------------------------------------------------------- similarity baselines
SIMILARITY_KINDS = ("dot", "cosine", "neg_l2")


def similarity_scores(train_images, query_images, kind: str = "cosine") -> np.ndarray:
    """Similarity baselines (DESIGN 1.4) on flattened vectors, raw pixels or image embeddings: (m, n).

    neg_l2 = -||x_i - z|| is computed directly (cdist), not via the norm expansion, so an exact
    duplicate gets exactly 0 and ranks first.
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"kind must be one of {SIMILARITY_KINDS}, got {kind!r}")
    x = np.asarray(train_images, dtype=np.float64)
    z = np.asarray(query_images, dtype=np.float64)
    x, z = _pair(x.reshape(x.shape[0], -1), z.reshape(z.shape[0], -1))
    if kind == "dot":
        return z @ x.T
    if kind == "cosine":
        return unit_rows(z) @ unit_rows(x).T
    return -cdist(z, x)
