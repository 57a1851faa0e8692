"""The objective contract and the denoiser contract (DESIGN.md contract 1).

An objective owns the forward process and the loss, and turns a trained network into a
`Denoiser`: D(x, sigma, cond) -> x0_hat in sigma-space (the EDM / k-diffusion convention), where

    x = x0 + sigma * eps        (the "VE" view of any Gaussian path x_t = alpha_t * x0 + s_t * eps:
                                  x = x_t / alpha_t, sigma = s_t / alpha_t)

Every continuous sampler consumes only this contract. Paths with a continuous time t also expose a
`Path` (alpha(t), s(t) and their derivatives) so that time-domain samplers (SDE, adaptive ODE) can
build the velocity field v = alpha'(t) x0 + s'(t) eps and the score -eps / s(t) from the denoiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..condition import Condition


@dataclass(frozen=True)
class Path:
    """A Gaussian path x_t = alpha(t) x0 + s(t) eps on t in [t_min, t_max] (t = 0 is data, t = 1 noise).

    `sigma_of_t` / `t_of_sigma` map between time and the VE noise level sigma = s/alpha.
    """

    name: str
    alpha: Callable[[torch.Tensor], torch.Tensor]
    s: Callable[[torch.Tensor], torch.Tensor]
    d_alpha: Callable[[torch.Tensor], torch.Tensor]
    d_s: Callable[[torch.Tensor], torch.Tensor]
    t_of_sigma: Callable[[torch.Tensor], torch.Tensor]
    t_min: float
    t_max: float

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return self.s(t) / self.alpha(t)


class Denoiser:
    """D(x, sigma, cond) -> x0_hat, with the sigma range the model was trained on.

    x: (B, C, H, W) in sigma-space; sigma: (B,) or a scalar tensor/float (> 0); returns (B, C, H, W).
    `path` is set for continuous-time objectives (None for discrete DDPM, whose own grid lives in the
    objective). Guidance builds the null condition from the condition itself (`Condition.null()`).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor], *,
                 sigma_min: float, sigma_max: float, path: Optional[Path] = None):
        self.fn = fn
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.path = path

    def __call__(self, x: torch.Tensor, sigma, cond: Condition) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return self.fn(x, sigma, cond)

    def wrap(self, fn: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]) -> "Denoiser":
        """A denoiser with the same sigma range and path but a different function (for wrappers)."""
        return Denoiser(fn, sigma_min=self.sigma_min, sigma_max=self.sigma_max, path=self.path)


# EDM's sigma_max (Karras et al. 2022, sec. 5): above it the data is a negligible part of x = x0 + sigma
# eps, and a Heun step that spans sigma 999 -> 20 (the linear interpolant's range) is unstable: its
# trapezoid averages slopes taken three orders of magnitude apart.
KARRAS_SIGMA_MAX = 80.0


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: n noise levels from sigma_max to sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sig = (sigma_max ** inv_rho + ramp * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def loglinear_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n noise levels uniform in log-SNR (= -2 log sigma) from sigma_max to sigma_min, then 0."""
    sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    return torch.cat([sig, sig.new_zeros(1)])
