"""The rectified-flow (RectFlow) path and conversions between x0, eps, velocity and score.

    x_t = (1 - t) x0 + t eps,   alpha_t = 1 - t, sigma_t = t,   t in [0, 1], t = 0 is data.
    v   = eps - x0 = (x_t - x0) / t
    s   = grad log p_t(x_t) = -eps_hat / t = -(x_t - (1 - t) x0_hat) / t^2
    v   = (-sigma_t s - x_t) / alpha_t                      (DD2 App. E.1)

t has shape (B, N, 1) (one time per token) or anything that broadcasts against (B, N, C).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class FlowConfig(BaseModel):
    """Time sampling for the RectFlow path x_t = (1 - t) x0 + t eps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t_min: float = Field(0.02, gt=0.0, lt=1.0, description="avoids the 1/t singularity of the posterior")
    t_max: float = Field(0.98, gt=0.0, le=1.0, description="upper end of U[t_min, t_max]")

    @model_validator(mode="after")
    def _t_range(self) -> FlowConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        return self


def sample_t(
    shape: tuple[int, ...], t_min: float, t_max: float, *, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """t ~ U[t_min, t_max] independently per entry (per token: shape (B, N, 1))."""
    u = torch.rand(shape, device=device, generator=generator)
    return t_min + (t_max - t_min) * u


def noisy(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Sample from q(x_t | x0): x_t = (1 - t) x0 + t eps."""
    return (1 - t) * x0 + t * eps


def velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The RectFlow velocity dx_t/dt = eps - x0."""
    return eps - x0


def x0_from_v(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0 = x_t - t v."""
    return x_t - t * v


def eps_from_v(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """eps = x_t + (1 - t) v."""
    return x_t + (1 - t) * v


def v_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """v = (x_t - x0) / t."""
    return (x_t - x0) / t


def score_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Tweedie: s = -(x_t - (1 - t) x0_hat) / t^2."""
    return -(x_t - (1 - t) * x0) / t**2


def x0_from_score(x_t: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Tweedie: x0_hat = (x_t + sigma_t^2 s) / alpha_t = (x_t + t^2 s) / (1 - t)."""
    return (x_t + t**2 * s) / (1 - t)


def v_from_score(x_t: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """v = (-sigma_t s - x_t) / alpha_t = (-t s - x_t) / (1 - t)   (DD2 App. E.1)."""
    return (-t * s - x_t) / (1 - t)


def score_from_v(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """s = -(x_t + (1 - t) v) / t, i.e. -eps_hat / t."""
    return -eps_from_v(x_t, v, t) / t
