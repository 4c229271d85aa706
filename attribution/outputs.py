"""Model-output functions f(x, t, eps) for TRAK-family attribution (DESIGN.md 1.1, 1.3).

Every output function has the signature ``fn(eps_pred, eps, t, schedule) -> Tensor (B,)``:

* ``eps_pred`` (B, C, H, W): the model's noise prediction eps_theta(x_t, t);
* ``eps`` (B, C, H, W): the noise that produced x_t (only the loss-type outputs use it);
* ``t`` (B,) long: the timesteps;
* ``schedule``: a :class:`NoiseSchedule`.

==========  =========================================================  ==============================
name        f per sample                                               used by
==========  =========================================================  ==============================
loss        mean((eps_pred - eps)^2)   (L_simple)                       TRAK, Journey-TRAK, TracIn
square      mean(eps_pred^2)           (L_Square)                       D-TRAK (best in its table 1)
average     mean(eps_pred)                                              D-TRAK ablation
l1          ||eps_pred||_1   (flattened)                                D-TRAK ablation
l2          ||eps_pred||_2   (flattened, NOT squared)                   D-TRAK ablation
linf        ||eps_pred||_inf (flattened)                                D-TRAK ablation
elbo        w_t * L_simple, w_t = beta_t / (2 alpha_t (1 - abar_t))     D-TRAK ablation
loss_l1     mean(|eps_pred - eps|)                                      official Diffusion-TracIn code
==========  =========================================================  ==============================

Plain torch, no Dagster.  The functions are written for a batch but are also what
:mod:`attribution.gradients` differentiates per sample under ``torch.func.vmap`` (a batch of one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "OutputFunction",
    "OUTPUT_FUNCTIONS",
    "get_output_function",
    "elbo_weights",
]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The DDPM noise schedule: 1-D tensors of length T (float32 or float64).

    ``alphas = 1 - betas`` and ``alphas_cumprod = cumprod(alphas)``.  :meth:`from_scheduler` keeps the scheduler's
    own tensors (float32 for diffusers' ``DDPMScheduler``) so that :meth:`add_noise` reproduces the x_t seen in
    training bit for bit (``DDPMScheduler.add_noise`` casts alphas_cumprod to the sample dtype before the sqrt; so do we).
    """

    alphas_cumprod: Tensor
    betas: Tensor
    alphas: Tensor

    def __post_init__(self) -> None:
        n = self.alphas_cumprod.shape
        if self.alphas_cumprod.ndim != 1 or self.betas.shape != n or self.alphas.shape != n:
            raise ValueError(
                "NoiseSchedule needs three 1-D tensors of equal length, got shapes "
                f"{tuple(self.alphas_cumprod.shape)}, {tuple(self.betas.shape)}, {tuple(self.alphas.shape)}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """From a diffusers ``DDPMScheduler`` (anything with ``betas``, ``alphas`` and ``alphas_cumprod``)."""
        betas = torch.as_tensor(scheduler.betas).detach().cpu()
        alphas = getattr(scheduler, "alphas", None)
        alphas = (1.0 - betas) if alphas is None else torch.as_tensor(alphas).detach().cpu()
        abar = getattr(scheduler, "alphas_cumprod", None)
        abar = torch.cumprod(alphas, 0) if abar is None else torch.as_tensor(abar).detach().cpu()
        return cls(alphas_cumprod=abar, betas=betas, alphas=alphas)

    @classmethod
    def from_betas(cls, betas: Tensor) -> "NoiseSchedule":
        betas = torch.as_tensor(betas)
        alphas = 1.0 - betas
        return cls(alphas_cumprod=torch.cumprod(alphas, 0), betas=betas, alphas=alphas)

    def _at(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t] cast to like's dtype/device, shaped (B, 1, ..., 1) to broadcast against like."""
        v = values.to(device=like.device, dtype=like.dtype)[t]
        return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (exactly as ``DDPMScheduler.add_noise``)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * eps


def elbo_weights(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """w_t = beta_t / (2 alpha_t (1 - abar_t)), computed in float64 from the betas alone.

    (Using a float32 ``alphas_cumprod`` would cost ~1e-4 relative accuracy at small t, where 1 - abar_t ~ beta_0.)
    """
    b = schedule.betas.to(torch.float64)
    a = 1.0 - b
    abar = torch.cumprod(a, 0)
    w = b / (2.0 * a * (1.0 - abar))
    return w.to(t.device)[t]


OutputFunction = Callable[[Tensor, Tensor, Tensor, NoiseSchedule], Tensor]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def output_loss(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred - eps).pow(2).mean(1)


def output_square(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred).pow(2).mean(1)


def output_average(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred).mean(1)


def output_l1(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred).abs().sum(1)


def output_l2(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return torch.linalg.vector_norm(_flat(eps_pred), ord=2, dim=1)


def output_linf(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred).abs().amax(1)


def output_elbo(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    loss = output_loss(eps_pred, eps, t, schedule)
    return elbo_weights(schedule, t).to(loss.dtype) * loss


def output_loss_l1(eps_pred: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    return _flat(eps_pred - eps).abs().mean(1)


OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {
    "loss": output_loss,
    "square": output_square,
    "average": output_average,
    "l1": output_l1,
    "l2": output_l2,
    "linf": output_linf,
    "elbo": output_elbo,
    "loss_l1": output_loss_l1,
}


def get_output_function(name: str) -> OutputFunction:
    """The output function called ``name``; ValueError naming the known ones otherwise."""
    try:
        return OUTPUT_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown output function {name!r}; known: {', '.join(sorted(OUTPUT_FUNCTIONS))}"
        ) from None
