"""Samplers: pure functions with one signature, kept in one registry by name (docs/DESIGN.md, "Sampler").

    fn(denoiser, noise, sigmas, *, cond, rng=None, callback=None, **options) -> x at sigma = 0

    from ditkit.samplers import get_sampler, guided
    spec = get_sampler("dpm++2m")
    x0 = spec.fn(guided(denoiser, 4.0), noise, sigmas, cond=cond, rng=rng)

Around them: guidance (`guidance`: classifier-free and autoguidance, wrappers of a denoiser) and the
model's own class evidence (`implicit`: what `generate(..., reject=M)` uses to redraw misread images).
"""

from .continuous import (sample_ddim, sample_ddpm, sample_dpmpp_1, sample_dpmpp_2m, sample_dpmpp_2s,
                         sample_euler, sample_heun)
from .guidance import autoguided, guided
from .registry import SAMPLERS, CountingDenoiser, SamplerSpec, count_calls, get_sampler
from .sde import DIFFUSIONS, ODE_METHODS, sample_adaptive, sample_euler_maruyama

__all__ = [
    "SAMPLERS", "SamplerSpec", "get_sampler", "CountingDenoiser", "count_calls", "guided", "autoguided",
    "sample_ddpm", "sample_ddim", "sample_dpmpp_1", "sample_dpmpp_2m", "sample_dpmpp_2s", "sample_euler",
    "sample_heun", "sample_euler_maruyama", "sample_adaptive", "DIFFUSIONS", "ODE_METHODS",
]
