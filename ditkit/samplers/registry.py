"""The sampler registry: every continuous sampler by name, with what a caller must know before running it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..condition import Condition
from ..errors import UsageError
from ..objectives.base import Denoiser
from . import continuous, maskgit, sde

SamplerFn = Callable[..., torch.Tensor]


def _per_step(steps: int) -> int:
    return steps


def _two_per_step_but_last(steps: int) -> int:
    return 2 * steps - 1


def _unknown(steps: int) -> Optional[int]:
    return None


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    stochastic: draws per-step noise with its default options (needs rng). ddim (eta > 0) and heun
      (s_churn > 0) become stochastic through an option; every sampler raises UsageError if it needs an
      rng that was not given.
    needs_path: integrates in time and needs `denoiser.path` (a continuous-time objective).
    nfe(steps): the exact number of denoiser calls for `steps` = len(sigmas) - 1 (None: not known in
      advance, e.g. the adaptive ODE solver, which reports it after the fact).
    kind: "continuous" samplers consume `D(x, sigma, cond)`; "discrete" ones (maskgit) a token model's
      logits; a model's objective says which kind it needs (`objective.kind`, "continuous" by default).
    """

    name: str
    fn: SamplerFn
    stochastic: bool
    needs_path: bool
    nfe: Callable[[int], Optional[int]]
    description: str
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default
    kind: str = "continuous"  # "continuous": over the denoiser contract; "discrete": over token logits

    def __call__(self, denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(denoiser, noise, sigmas, **kwargs)


def _spec(fn: SamplerFn, stochastic: bool, needs_path: bool, nfe: Callable[[int], Optional[int]],
          description: str) -> SamplerSpec:
    return SamplerSpec(fn.sampler_name, fn, stochastic, needs_path, nfe, description, dict(fn.options))


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in [
    _spec(continuous.sample_ddpm, True, False, _per_step,
          "DDPM ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020)"),
    _spec(continuous.sample_ddim, False, False, _per_step,
          "DDIM (Song et al. 2021); option eta in [0, 1] (0 deterministic, 1 = DDPM)"),
    _spec(continuous.sample_dpmpp_1, False, False, _per_step,
          "first-order DPM-Solver++ (Lu et al. 2022), identical to DDIM eta=0"),
    _spec(continuous.sample_dpmpp_2m, False, False, _per_step,
          "DPM-Solver++(2M), multistep second order (Lu et al. 2022, Alg. 2)"),
    _spec(continuous.sample_dpmpp_2m_sde, True, False, _per_step,
          "SDE-DPM-Solver++(2M): the stochastic DPM-Solver++ (Lu et al. 2022), fresh noise at every step"),
    _spec(continuous.sample_dpmpp_2s, False, False, _two_per_step_but_last,
          "DPM-Solver++(2S), single-step second order, r = 1/2 (Lu et al. 2022, Alg. 1)"),
    _spec(continuous.sample_euler, False, False, _per_step,
          "Euler on the probability-flow ODE (Karras et al. 2022)"),
    _spec(continuous.sample_heun, False, False, _two_per_step_but_last,
          "Heun 2nd order (Karras et al. 2022, Alg. 1); s_churn > 0 gives the stochastic Alg. 2"),
    _spec(sde.sample_euler_maruyama, True, True, _per_step,
          "Euler-Maruyama on SiT's reverse SDE (Ma et al. 2024); options diffusion, diffusion_scale"),
    _spec(sde.sample_adaptive, False, True, _unknown,
          "adaptive probability-flow ODE via scipy solve_ivp (method, rtol, atol); NFE via nfe_out/callback"),
    SamplerSpec("maskgit", maskgit.sample_maskgit, True, False, _per_step,
                "MaskGIT parallel decoding of a masked image model's tokens (Chang et al. 2022): options "
                "temperature, choice_temperature", dict(maskgit.OPTIONS), kind="discrete"),
]}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler registered as `name`; UsageError listing the allowed names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}") from None


class CountingDenoiser(Denoiser):
    """A denoiser that counts its calls, to measure a sampler's true NFE.

    `calls`: number of forward calls (the NFE; a guided forward on 2B rows counts once when this wraps
    the guided denoiser, or as one call of 2B `images` when it wraps the network's denoiser).
    `images`: total rows evaluated.
    """

    def __init__(self, inner: Denoiser):
        super().__init__(self._forward, sigma_min=inner.sigma_min, sigma_max=inner.sigma_max, path=inner.path)
        self.inner = inner
        self.calls = 0
        self.images = 0

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        self.calls += 1
        self.images += int(x.shape[0])
        return self.inner(x, sigma, cond)


def count_calls(denoiser: Denoiser) -> CountingDenoiser:
    """Wrap `denoiser` so that `.calls` counts network evaluations (see CountingDenoiser)."""
    return CountingDenoiser(denoiser)
