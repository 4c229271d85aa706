"""Per-sample attribution methods (DESIGN 1.1-1.4): which feature matrices each method needs, how a batch of feature
rows is computed, and how features become a (queries x train) score matrix.

A method is a set of FeatureRecipes (train and query side, per checkpoint for TracIn) plus a scorer:

| method        | train features                                   | query features                                  |
|---------------|--------------------------------------------------|-------------------------------------------------|
| trak / dtrak  | grad f averaged over K timesteps, common noise   | the same recipe                                 |
| journey_trak  | grad L_simple at K random timesteps, fresh noise | per sampling step: x0_hat(t) re-noised at t     |
| tracin        | grad loss at the sample's last training timestep | grad loss averaged over a K grid x noise draws  |
| retrac        | the same, divided by its L2 norm                 | each per-timestep gradient normalized first     |
| pixel         | none: cosine/dot/-L2 on pixels                   |                                                 |
| embedding     | none: cosine/dot/-L2 on in-domain encoder embeddings                                               |

Every normalization happens on the full gradient before the (linear) projection, as the papers define it.
Plain torch/numpy: storage and orchestration live in storage/ and assets/.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .experiment import MethodSpec

ROLES = ("train", "query")


@dataclass(frozen=True)
class FeatureRecipe:
    method: str
    kind: str
    role: str            # "train" | "query"
    output: str
    timesteps: str       # "uniform" | "random" | "recorded" (TracIn train) | "trajectory" (Journey-TRAK query)
    K: int
    noise: str           # "common" (shared by all samples: D-TRAK's common random numbers) | "per_sample"
    noise_draws: int
    normalize: str       # "none" | "full" (ReTrac train) | "per_timestep" (ReTrac query)
    checkpoint: int | None = None

    @property
    def store_name(self) -> str:
        ckpt = "" if self.checkpoint is None else f"_ckpt{self.checkpoint}"
        return f"{self.method}_{self.role}{ckpt}"

    def to_dict(self) -> dict:
        return asdict(self)


def feature_recipes(name: str, method: MethodSpec, n_checkpoints: int) -> list[FeatureRecipe]:
    """Every feature matrix the method needs, train before query; [] for pixel similarity."""
    base = dict(method=name, kind=method.kind, output=method.output)
    if method.kind == "trak":
        noise = "common" if method.timesteps == "uniform" else "per_sample"
        return [FeatureRecipe(**base, role=r, timesteps=method.timesteps, K=method.K, noise=noise, noise_draws=1,
                              normalize="none") for r in ROLES]
    if method.kind == "journey_trak":
        return [
            FeatureRecipe(**base, role="train", timesteps="random", K=method.K, noise="per_sample", noise_draws=1,
                          normalize="none"),
            FeatureRecipe(**base, role="query", timesteps="trajectory", K=1, noise="per_sample",
                          noise_draws=method.noise_draws, normalize="none"),
        ]
    if method.kind in ("tracin", "retrac"):
        ckpts = method.checkpoints if method.checkpoints is not None else list(range(n_checkpoints))
        bad = [c for c in ckpts if not 0 <= c < n_checkpoints]
        if bad:
            raise ValueError(f"method {name}: checkpoints {bad} do not exist (the model saved {n_checkpoints})")
        retrac = method.kind == "retrac"
        recipes = []
        for c in ckpts:
            recipes.append(FeatureRecipe(**base, role="train", timesteps="recorded", K=1, noise="per_sample",
                                         noise_draws=1, normalize="full" if retrac else "none", checkpoint=c))
            recipes.append(FeatureRecipe(**base, role="query", timesteps="uniform", K=method.K, noise="per_sample",
                                         noise_draws=method.noise_draws,
                                         normalize="per_timestep" if retrac else "none", checkpoint=c))
        return recipes
    if method.kind in ("pixel", "embedding"):
        return []
    raise ValueError(f"unknown method kind {method.kind!r}")


# Keys of a feature-store spec that must agree between the train and query side before they may be scored together.
SHARED_SPEC_KEYS = ("model_digest", "num_params", "projector", "output", "checkpoint", "method", "noise_seed")


def feature_spec(recipe: FeatureRecipe, *, model_digest: str, num_params: int, projector: dict, noise_seed: int,
                 data_hash: str, n_rows: int) -> dict:
    """The JSON spec recorded in a feature store: everything that determines its values."""
    return {**recipe.to_dict(), "model_digest": model_digest, "num_params": num_params, "projector": projector,
            "noise_seed": noise_seed, "data_hash": data_hash, "n_rows": n_rows}


def check_compatible(train_spec: dict, query_spec: dict) -> None:
    """Refuse to score query features against train features computed differently (another model, k, seed...)."""
    diffs = [f"{k}: train={train_spec.get(k)!r} query={query_spec.get(k)!r}" for k in SHARED_SPEC_KEYS
             if train_spec.get(k) != query_spec.get(k)]
    if diffs:
        raise ValueError("train and query features were computed with different settings and cannot be scored "
                         "together:\n  " + "\n  ".join(diffs) + "\nrematerialize the feature asset so both sides "
                         "come from the same model and projection")


class Featurizer:
    """Projected, timestep-averaged per-sample gradients for one recipe; batches are independent of each other."""

    def __init__(self, unet, schedule, recipe: FeatureRecipe, *, projector: str, proj_dim: int, proj_seed: int,
                 noise_seed: int, param_filter=None, threads: int = 1):
        """``threads``: CPU threads of the projection (the gradients take one thread, or the GPU): the same rows
        for any number."""
        from .gradients import GradientEngine
        from .projectors import make_projector

        self.recipe = recipe
        self.engine = GradientEngine(unet, schedule, recipe.output, param_filter=param_filter)
        self.projector = make_projector(projector, self.engine.num_params,
                                        self.engine.num_params if projector == "identity" else proj_dim, proj_seed,
                                        threads=threads)
        self.noise_seed = noise_seed
        self.T = schedule.num_train_timesteps

    @property
    def dim(self) -> int:
        return self.projector.k

    def rows(self, x0: np.ndarray, ids: np.ndarray, t: np.ndarray | None = None,
             cond: np.ndarray | None = None) -> np.ndarray:
        """Feature rows for images x0 (B, C, H, W) with stable row ids (B,) (they seed the noise and random
        timesteps, so a row never depends on its batch). `t` (B,): the recorded training timestep (TracIn train;
        -1 = not trained yet, giving a zero row) or the trajectory timestep (Journey-TRAK query). `cond`
        (B, tokens, dim): each row's encoder_hidden_states for a conditional model."""
        from .runtime import single_thread

        with single_thread():
            return self._rows(x0, ids, t, cond)

    def _rows(self, x0, ids, t, cond) -> np.ndarray:
        import torch

        from .timesteps import common_noise_fn, sample_noise_fn, timesteps

        r = self.recipe
        x = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))
        ids = [int(i) for i in ids]
        shape = tuple(x.shape[1:])
        if r.timesteps in ("uniform", "random"):
            t_sets = timesteps(r.timesteps, r.K, self.T, ids, seed=self.noise_seed)
        else:
            if t is None:
                raise ValueError(f"recipe {r.store_name} needs per-row timesteps")
            t_sets = torch.as_tensor(np.maximum(t, 0), dtype=torch.long).reshape(-1, 1)
        eps = common_noise_fn(self.noise_seed, shape) if r.noise == "common" else \
            sample_noise_fn(self.noise_seed, ids, shape)
        c = None if cond is None else torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))
        # column blocks: the projector reads the layer backend's per-parameter gradients where they lie
        grads = self.engine.averaged_grads(x, t_sets, eps, c, noise_draws=r.noise_draws,
                                           normalize_per_timestep=r.normalize == "per_timestep", blocks=True)
        if r.normalize == "full":
            G = self.engine.dense(grads)
            grads = [G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)]
        if r.timesteps == "recorded":
            untrained = torch.as_tensor(np.asarray(t) < 0).to(self.engine.device)
            for g in grads:
                g[untrained] = 0.0
        return self.projector.project(grads).numpy()


def journey_query_inputs(x0_hat: np.ndarray, step_timesteps: np.ndarray, images: np.ndarray, n_generated: int):
    """Rows (query, step) of Journey-TRAK's query side: x0_hat of each sampling step of each generated query; a
    held-out query has no trajectory, so its own image stands in for x0_hat at every step (re-noised per step).
    -> (images (m*S, C, H, W), timesteps (m*S,), S)."""
    m, S = len(images), len(step_timesteps)
    traj = np.empty((m, S, *images.shape[1:]), dtype=np.float32)
    traj[:n_generated] = x0_hat[:n_generated]
    traj[n_generated:] = images[n_generated:, None]
    return traj.reshape(m * S, *images.shape[1:]), np.tile(np.asarray(step_timesteps), m), S


def kernel_lambda(train: np.ndarray, factor: float) -> float:
    from .scoring import lambda_scale

    return float(factor * lambda_scale(train))


def trak_scores(method: MethodSpec, train: np.ndarray, query: np.ndarray, lambda_factor: float):
    """-> (scores (m, n), lambda used or None)."""
    from .scoring import SCORERS

    lam = kernel_lambda(train, lambda_factor) if method.scorer in ("kernel", "relative_if", "renormalized_if") \
        else None
    return SCORERS[method.scorer](train, query, lam=lam), lam


def journey_scores(method: MethodSpec, train: np.ndarray, query_steps: np.ndarray, n_steps: int,
                   lambda_factor: float):
    """-> (collapsed scores (m, n), per-step scores (m, S, n), lambda). Collapsed = mean over steps, which equals
    scoring the step-averaged query gradient because every scorer here is linear in the query features."""
    per_step, lam = trak_scores(method, train, query_steps, lambda_factor)
    per_step = per_step.reshape(-1, n_steps, per_step.shape[1])
    return per_step.mean(axis=1), per_step, lam


def tracin_method_scores(train_by_ckpt: list[np.ndarray], query_by_ckpt: list[np.ndarray],
                         lr_weights: np.ndarray) -> np.ndarray:
    """Sum over checkpoints of lr-weighted inner products (any ReTrac normalization is already in the features)."""
    from .tracin import tracin_scores

    return tracin_scores(train_by_ckpt, query_by_ckpt, lr_weights, renormalize=False)
