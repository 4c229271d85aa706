"""Batched per-sample gradients of an output function for a diffusers UNet (DESIGN.md 1.1-1.3).

The hot path of feature computation.  Two backends compute the same per-sample gradients, never with a Python
loop over samples:

* ``"layers"`` (default whenever every selected parameter sits in a Linear, Conv2d, GroupNorm, LayerNorm or
  Embedding module - true of diffusers UNets and of peft LoRA adapters): one ordinary batched forward and
  backward with per-layer rules (:mod:`attribution.layer_grads`), the cost of one forward+backward pass;
* ``"vmap"``: ``torch.func`` (``vmap(grad(functional_call(...)))``), for any model; the reference the layer
  rules are tested against.

Timesteps are handled by a loop over *chunks of timesteps* (not over samples): each sample runs a forward of
``timestep_chunk`` noised copies of itself and the gradient of their summed output is accumulated, so the
accumulator (B x p floats) is the only p-sized buffer besides the per-chunk gradient.  The layer backend keeps the
gradients as per-parameter column blocks, as its kernels produce them; ``blocks=True`` hands them over as they are
(projectors read them without joining them into one matrix: a copy of every gradient, 3-7% of the small model's
time), otherwise they are joined into the (B, p) matrix.

Typical feature-store use::

    engine = GradientEngine(unet, NoiseSchedule.from_scheduler(scheduler), "square")
    t_sets = timesteps("uniform", 10, 1000, ids)                     # (B, K)
    G = engine.averaged_grads(x0, t_sets, common_noise_fn(seed, x0.shape[1:]), blocks=True)   # p columns
    phi = projector.project(G)                                        # (B, k)

Averaging over timesteps happens *before* projection; since the projection is linear this equals averaging
projected per-timestep gradients, at 1/K of the projection cost.

Notes
-----
* The engine puts the model in ``eval()`` mode and, when it contains diffusers ``Attention`` modules, switches
  them to the classic ``AttnProcessor`` (SDPA has no CPU batching rule for ``vmap``; both backends then run the
  same arithmetic).  Both are numerically equivalent to training-time behaviour up to float rounding (no dropout
  is used by the papers' models at attribution time).
* The selected parameters are *views* of the model's own tensors (``detach()`` shares storage), so
  ``model.load_state_dict(checkpoint)`` between calls (TracIn over checkpoints) is picked up without rebuilding.
* Computation runs on the model's device (:attr:`GradientEngine.device`): inputs are moved there, and the
  gradients stay there for the projector to fetch.
* Results are deterministic for a fixed batch: running a shard with the same row boundaries reproduces the
  full run's rows bit for bit.  Different batch sizes or backends may round differently (kernels are picked by
  shape).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .layer_grads import LayerGradients, unsupported
from .models import use_classic_attention
from .outputs import NoiseSchedule, get_output_function

__all__ = ["select_parameters", "GradientEngine", "EpsSource", "BACKENDS"]

BACKENDS = ("auto", "layers", "vmap")

# eps for averaged_grads: a tensor (B, K, C, H, W) or (B, K, R, C, H, W), or eps_fn(t, row) / eps_fn(t, row, draw)
EpsSource = Tensor | Callable[..., Tensor]
Grads = Tensor | list  # (B, p) matrix, or its per-parameter (B, numel) column blocks (see GradientEngine.blocks)


def select_parameters(
    model: nn.Module, names: Callable[[str], bool] | Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The parameters to differentiate, in the model's ``named_parameters()`` order (a fixed, documented order).

    ``names``: ``None`` = every parameter with ``requires_grad`` (a LoRA-wrapped model has only the adapters
    trainable); a predicate on the parameter name; or an explicit list of names (unknown names raise).
    Returns detached tensors that share storage with the model's parameters.
    """
    named = dict(model.named_parameters())
    if names is None:
        keep = [n for n, p in named.items() if p.requires_grad]
    elif callable(names):
        keep = [n for n in named if names(n)]
    else:
        wanted = set(names)
        unknown = sorted(wanted - set(named))
        if unknown:
            raise ValueError(f"unknown parameter names: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        keep = [n for n in named if n in wanted]
    if not keep:
        raise ValueError("parameter selection is empty")
    return {n: named[n].detach() for n in keep}


def _default_forward(model: nn.Module) -> Callable:
    """forward(call, x_t, t, cond) -> eps_pred for UNet2DModel (cond = class labels) or UNet2DConditionModel."""
    conditional = getattr(getattr(model, "config", None), "cross_attention_dim", None) is not None

    def forward(call: Callable, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            out = call(x_t, t)
        elif conditional:
            out = call(x_t, t, encoder_hidden_states=cond)
        else:
            out = call(x_t, t, class_labels=cond)
        return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out

    return forward


class GradientEngine:
    """Per-sample gradients of ``f(x0, t, eps) = output(model(add_noise(x0, eps, t), t), eps, t)``.

    Parameters
    ----------
    model: a diffusers ``UNet2DModel`` (eps prediction) or any module with the same call convention.
    schedule: the training noise schedule.
    output: an output-function name from :data:`attribution.outputs.OUTPUT_FUNCTIONS`.
    param_filter: passed to :func:`select_parameters` (None = all trainable parameters).
    chunk_size: the most samples differentiated together (bounds activation memory; None = the whole batch).
    timestep_chunk: the most timesteps (x noise draws) run together in one per-sample forward in
        :meth:`averaged_grads`; the K columns are split into that many near-equal chunks (K=10 runs as one chunk of
        10, K=20 as two of 10: one chunk of 10 ran 1.2-1.3x faster than chunks of 8 + 2 on the default model).
        Larger is faster and uses more activation memory.  Changes rounding only.
    forward: optional ``forward(call, x_t, t, cond) -> eps_pred`` where ``call(*args, **kw)`` runs the model
        with the engine's parameters (default: ``call(x_t, t).sample``; with ``cond``, class labels for a
        UNet2DModel, ``encoder_hidden_states`` for a UNet2DConditionModel).
    backend: ``"layers"``, ``"vmap"`` or ``"auto"`` (layers when every selected parameter has a layer rule,
        else vmap; :attr:`backend` says which, :attr:`backend_reason` why).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        output: str,
        param_filter: Callable[[str], bool] | Sequence[str] | None = None,
        chunk_size: int | None = None,
        timestep_chunk: int = 16,
        forward: Callable | None = None,
        backend: str = "auto",
    ) -> None:
        self.model = model
        model.eval()
        self.num_attention_modules = use_classic_attention(model)
        self.schedule = schedule
        self.output = output
        self.output_fn = get_output_function(output)
        self.params = select_parameters(model, param_filter)
        self.param_names: list[str] = list(self.params)
        self.param_shapes: list[torch.Size] = [p.shape for p in self.params.values()]
        self.param_numels: list[int] = [p.numel() for p in self.params.values()]
        self.num_params: int = int(sum(self.param_numels))
        self.device: torch.device = next(iter(self.params.values())).device
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self.params}
        frozen.update({n: b.detach() for n, b in model.named_buffers()})
        self._frozen = frozen
        self.chunk_size = chunk_size
        if timestep_chunk < 1:
            raise ValueError("timestep_chunk must be >= 1")
        self.timestep_chunk = int(timestep_chunk)
        self._forward = forward or _default_forward(model)
        self._vmapped: dict[bool, Callable] = {}
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        bad = unsupported(model, self.param_names) if backend != "vmap" else []
        if backend == "layers" and bad:
            raise ValueError(f"backend 'layers' has no rule for parameters {bad[:5]} (their modules are not Linear, "
                             "Conv2d, GroupNorm, LayerNorm or Embedding, or are shared): use backend 'vmap' or 'auto'")
        self.backend = "vmap" if backend == "vmap" or bad else "layers"
        self.backend_reason = ("requested" if backend != "auto" else
                               f"no layer rule for {len(bad)} parameter(s), e.g. {bad[0]}" if bad else
                               "every parameter has a layer rule")
        self._layers = LayerGradients(model, self.params) if self.backend == "layers" else None

    # ------------------------------------------------------------------ core
    def _objective(self, params: Mapping[str, Tensor], x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None):
        """One sample (no batch dim): x0 (C,H,W), t (m,), eps (m,C,H,W) -> sum of the m outputs."""
        m = t.shape[0]
        x = x0.unsqueeze(0).expand((m,) + tuple(x0.shape))
        x_t = self.schedule.add_noise(x, eps, t)
        c = None if cond is None else cond.unsqueeze(0).expand((m,) + tuple(cond.shape))
        merged = {**self._frozen, **params}

        def call(*args, **kwargs):
            return functional_call(self.model, merged, args, kwargs)

        pred = self._forward(call, x_t, t, c)
        return self.output_fn(pred, eps, t, self.schedule).sum()

    def _batched_grad(self, with_cond: bool) -> Callable:
        if with_cond not in self._vmapped:
            in_dims = (None, 0, 0, 0, 0 if with_cond else None)
            self._vmapped[with_cond] = vmap(grad(self._objective), in_dims=in_dims, chunk_size=self.chunk_size)
        return self._vmapped[with_cond]

    def flatten(self, grads: Mapping[str, Tensor]) -> Tensor:
        """dict of (B, *shape) gradients -> (B, p) float32 in ``param_names`` order."""
        B = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(B, -1) for n in self.param_names], dim=1).to(torch.float32)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """(..., p) -> dict of (..., *shape) in ``param_names`` order (views)."""
        parts = torch.split(flat, self.param_numels, dim=-1)
        lead = tuple(flat.shape[:-1])
        return {n: v.reshape(lead + tuple(s)) for n, v, s in zip(self.param_names, parts, self.param_shapes)}

    def _grads_multi(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None, scale: float = 1.0,
                     out: Grads | None = None) -> Grads:
        """x0 (B,C,H,W), t (B,m), eps (B,m,C,H,W) -> scale * gradient of sum_m f per sample (added into ``out``
        when given): (B, p) float32 from the vmap backend, per-parameter (B, numel) blocks from the layer one."""
        t, eps = t.to(x0.device), eps.to(x0.device)
        if self._layers is None:
            g = self.flatten(self._batched_grad(cond is not None)(self.params, x0, t, eps, cond))
            g = g if scale == 1.0 else g.mul_(scale)
            return g if out is None else out.add_(g)
        B = x0.shape[0]
        step = self.chunk_size or B
        if step >= B:
            return self._layer_grads(x0, t, eps, cond, scale, out)
        if out is None:
            out = [torch.zeros(B, n, dtype=torch.float32, device=x0.device) for n in self.param_numels]
        for s in range(0, B, step):
            rows = slice(s, min(B, s + step))
            c = None if cond is None else cond[rows]
            self._layer_grads(x0[rows], t[rows], eps[rows], c, scale, [o[rows] for o in out])
        return out

    def _layer_grads(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None, scale: float,
                     out: list[Tensor] | None) -> list[Tensor]:
        """The batched form of :meth:`_objective`: all B*m rows in one forward, per-sample sums by layer rules."""
        B, m = t.shape
        shape = tuple(x0.shape[1:])
        x = x0.detach().unsqueeze(0).expand((m, B) + shape).reshape((m * B,) + shape)  # time-major rows
        e = eps.detach().transpose(0, 1).reshape(x.shape)
        tf = t.T.reshape(-1)
        c = None if cond is None else cond.detach().unsqueeze(0).expand((m,) + tuple(cond.shape)).flatten(0, 1)

        def loss() -> Tensor:
            pred = self._forward(self.model, self.schedule.add_noise(x, e, tf), tf, c)
            total = self.output_fn(pred, e, tf, self.schedule).sum()
            return total if scale == 1.0 else total * scale

        return self._layers.compute(loss, B, out)

    def dense(self, g: Grads) -> Tensor:
        """Gradients as one (B, p) float32 matrix."""
        return g if isinstance(g, Tensor) else torch.cat(g, dim=1).to(torch.float32)

    def blocks(self, g: Grads) -> list[Tensor]:
        """Gradients as per-parameter (B, numel) column blocks in ``param_names`` order (views of a matrix)."""
        return g if isinstance(g, list) else list(g.split(self.param_numels, dim=1))

    @staticmethod
    def _check(x0: Tensor, t: Tensor) -> None:
        if x0.ndim != 4:
            raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
        if t.shape[0] != x0.shape[0]:
            raise ValueError(f"timesteps have batch {t.shape[0]} but x0 has {x0.shape[0]}")

    # ------------------------------------------------------------------ public API
    def per_sample_grads(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, p) float32: row i = grad_theta f(x0[i], t[i], eps[i]).  t: (B,) long, eps: (B, C, H, W)."""
        t = torch.as_tensor(t, dtype=torch.long)
        self._check(x0, t)
        if eps.shape != x0.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != x0 shape {tuple(x0.shape)}")
        x0, cond = self._on_device(x0, cond)
        return self.dense(self._grads_multi(x0, t.reshape(-1, 1), eps.unsqueeze(1), cond))

    def _on_device(self, x0: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return x0.to(self.device), None if cond is None else cond.to(self.device)

    def _eps_chunk(self, eps: EpsSource, x0: Tensor, t_sets: Tensor, ks: range, draws: int) -> Tensor:
        """(B, len(ks) * draws, C, H, W) noise for timestep columns ks, ordered (k, draw)."""
        B = x0.shape[0]
        if isinstance(eps, Tensor):
            if eps.ndim == x0.ndim + 1:  # (B, K, C, H, W)
                if draws != 1:
                    raise ValueError("noise_draws > 1 needs eps of shape (B, K, R, C, H, W) or a callable")
                e = eps[:, ks.start : ks.stop]
            elif eps.ndim == x0.ndim + 2:  # (B, K, R, C, H, W)
                if eps.shape[2] != draws:
                    raise ValueError(f"eps has {eps.shape[2]} draws but noise_draws={draws}")
                e = eps[:, ks.start : ks.stop].reshape((B, len(ks) * draws) + tuple(x0.shape[1:]))
            else:
                raise ValueError(f"eps tensor must be (B,K,C,H,W) or (B,K,R,C,H,W), got {tuple(eps.shape)}")
            return e.to(dtype=x0.dtype, device=x0.device)
        per = [eps(t, row) if draws == 1 else eps(t, row, r)
               for row, ts in enumerate(t_sets[:, ks.start : ks.stop].tolist()) for t in ts for r in range(draws)]
        e = torch.stack(per)
        return e.view((B, len(ks) * draws) + tuple(e.shape[1:])).to(dtype=x0.dtype, device=x0.device)

    def averaged_grads(
        self,
        x0: Tensor,
        t_sets: Tensor,
        eps: EpsSource,
        cond: Tensor | None = None,
        *,
        noise_draws: int = 1,
        normalize_per_timestep: bool = False,
        timestep_chunk: int | None = None,
        blocks: bool = False,
    ) -> Tensor | list[Tensor]:
        """(B, p) float32: (1/K) sum_k g_k with g_k = (1/R) sum_r grad f(x0, t_sets[:, k], eps_{k,r}).

        ``eps``: a tensor (B, K, C, H, W) (R = 1) or (B, K, R, C, H, W), or a callable ``eps_fn(t, row)``
        (``eps_fn(t, row, draw)`` when ``noise_draws > 1``) returning (C, H, W), row = index in this batch
        (see :func:`attribution.timesteps.common_noise_fn` / :func:`~attribution.timesteps.sample_noise_fn`).
        ``normalize_per_timestep``: divide each g_k by its L2 norm before averaging (Diffusion-ReTrac queries).
        ``blocks``: return the same numbers as per-parameter column blocks (:meth:`blocks`), which the layer
        backend produces without joining them into one matrix (a projector reads them as they are).
        """
        t_sets = torch.as_tensor(t_sets, dtype=torch.long)
        if t_sets.ndim != 2:
            raise ValueError(f"t_sets must be (B, K), got shape {tuple(t_sets.shape)}")
        self._check(x0, t_sets)
        x0, cond = self._on_device(x0, cond)
        B, K = t_sets.shape
        R = int(noise_draws)
        if R < 1:
            raise ValueError("noise_draws must be >= 1")
        if normalize_per_timestep:
            acc = torch.zeros(B, self.num_params, dtype=torch.float32, device=self.device)
            for k in range(K):
                g = self._timestep_grad(x0, t_sets, eps, cond, k, R)
                acc += g / _row_norms(g)
            acc.div_(K)
            return self.blocks(acc) if blocks else acc
        cap = max(1, (timestep_chunk or self.timestep_chunk) // R)
        tc = math.ceil(K / math.ceil(K / cap))  # near-equal chunks: no small remainder chunk
        acc = None
        for start in range(0, K, tc):
            ks = range(start, min(K, start + tc))
            t_chunk = t_sets[:, ks.start : ks.stop].repeat_interleave(R, dim=1)
            e = self._eps_chunk(eps, x0, t_sets, ks, R)
            acc = self._grads_multi(x0, t_chunk, e, cond, scale=1.0 / (K * R), out=acc)
        return self.blocks(acc) if blocks else self.dense(acc)

    def _timestep_grad(self, x0, t_sets, eps, cond, k: int, R: int) -> Tensor:
        t_chunk = t_sets[:, k : k + 1].repeat_interleave(R, dim=1)
        e = self._eps_chunk(eps, x0, t_sets, range(k, k + 1), R)
        return self.dense(self._grads_multi(x0, t_chunk, e, cond, scale=1.0 / R))

    def query_grads_per_timestep(
        self,
        x0: Tensor,
        t_sets: Tensor,
        eps: EpsSource,
        cond: Tensor | None = None,
        *,
        noise_draws: int = 1,
        normalize: bool = False,
    ) -> Tensor:
        """(B, K, p) float32: g_k per timestep column (averaged over R noise draws), optionally L2-normalised.

        Memory is B*K*p floats; use :meth:`averaged_grads` with ``normalize_per_timestep=True`` when only the
        ReTrac average is needed.  Journey-TRAK per-step query gradients are the R-draw case with K = 1 per step.
        """
        t_sets = torch.as_tensor(t_sets, dtype=torch.long)
        self._check(x0, t_sets)
        x0, cond = self._on_device(x0, cond)
        B, K = t_sets.shape
        out = torch.empty(B, K, self.num_params, dtype=torch.float32, device=self.device)
        for k in range(K):
            g = self._timestep_grad(x0, t_sets, eps, cond, k, int(noise_draws))
            out[:, k] = g / _row_norms(g) if normalize else g
        return out


def _row_norms(g: Tensor) -> Tensor:
    """(B, 1) L2 norms, with 1 in place of 0 so that an all-zero gradient stays zero."""
    n = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    return torch.where(n > 0, n, torch.ones_like(n))
