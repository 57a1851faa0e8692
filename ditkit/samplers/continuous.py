"""Samplers in sigma-space: x = x0 + sigma * eps, driven only by the denoiser D(x, sigma, cond) -> x0_hat.

Every sampler here is a pure function with the shared signature (docs/DESIGN.md, "Sampler"):

    fn(denoiser, noise, sigmas, *, cond, rng=None, callback=None, **options) -> x at sigma = 0

- `noise` (B, ...) is unit-variance, drawn per image by the caller; the sampler starts at noise * sigmas[0].
- `sigmas` is the objective's grid: 1-D, strictly decreasing, length steps + 1, last entry 0. Sigma values
  are read from it as Python floats (float64); tensors stay in the dtype of `noise`.
- Stochastic samplers draw every per-step noise with `rng.randn_like(x)` (an `ImageRNG`, one generator per
  image), so an image never depends on its batch neighbours.
- `callback({"x", "i", "sigma", "denoised", ...})` runs once per step, before the update: x is the state
  at sigma = sigmas[i] and denoised = D(x, sigma). No sampler prints; no sampler keeps state between calls
  (a multistep history lives in local variables).

In sigma-space the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022,
eq. 3 with s = 1), so DDIM (eta = 0), Euler and first-order DPM-Solver++ are one and the same update.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Optional

import torch

from ..condition import Condition
from ..errors import UsageError
from ..objectives.base import Denoiser
from ..utils import ImageRNG

Callback = Callable[[dict[str, Any]], None]
_COMMON = ("cond", "rng", "callback")


# ---------------------------------------------------------------------------------------------
# Shared plumbing: option checking, grid checking, callback.
# ---------------------------------------------------------------------------------------------


def sampler(name: str) -> Callable:
    """Mark `fn` as the sampler `name`: unknown options become a UsageError naming the allowed ones.

    The allowed options are the keyword-only parameters of `fn` other than cond / rng / callback;
    they are kept on the wrapper as `.options` (name -> default) and the name as `.sampler_name`.
    """

    def deco(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        options = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in _COMMON}

        @functools.wraps(fn)
        def wrapper(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            unknown = sorted(set(kwargs) - set(options) - set(_COMMON))
            if unknown:
                allowed = ", ".join(options) or "none"
                raise UsageError(f"sampler {name!r}: unknown option(s) {', '.join(unknown)}; "
                                 f"allowed options: {allowed}")
            if "cond" not in kwargs:
                raise UsageError(f"sampler {name!r}: pass cond= (a Condition; Condition.none(batch) if unconditional)")
            return fn(denoiser, noise, sigmas, **kwargs)

        wrapper.sampler_name = name
        wrapper.options = options
        return wrapper

    return deco


def check_inputs(name: str, noise: torch.Tensor, sigmas: torch.Tensor, cond: Condition,
                 rng: Optional[ImageRNG], *, needs_rng: bool) -> list[float]:
    """Validate the shared arguments; return the grid as Python floats (float64)."""
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or not noise.is_floating_point():
        raise UsageError(f"sampler {name!r}: noise must be a floating tensor (B, C, H, W), got "
                         f"{getattr(noise, 'shape', type(noise).__name__)}")
    grid = torch.as_tensor(sigmas)
    if grid.ndim != 1 or grid.numel() < 2 or not grid.is_floating_point():
        raise UsageError(f"sampler {name!r}: sigmas must be a 1-D float tensor of length steps + 1 >= 2")
    sig = grid.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(v) for v in sig) or sig[-1] != 0.0:
        raise UsageError(f"sampler {name!r}: sigmas must be finite and end with 0, got last value {sig[-1]}")
    if any(b >= a for a, b in zip(sig, sig[1:])):
        raise UsageError(f"sampler {name!r}: sigmas must be strictly decreasing")
    B = noise.shape[0]
    if needs_rng and rng is None:
        raise UsageError(f"sampler {name!r} with these options draws per-step noise: pass rng=ImageRNG(seeds) "
                         "(one seed per image)")
    if rng is not None and len(rng) != B:
        raise UsageError(f"sampler {name!r}: rng has {len(rng)} generators for a batch of {B} images")
    if (cond.labels is not None or cond.tokens is not None) and len(cond) != B:
        raise UsageError(f"sampler {name!r}: cond has {len(cond)} entries for a batch of {B} images")
    return sig


def report(callback: Optional[Callback], x: torch.Tensor, i: int, sigma: float, denoised: torch.Tensor,
           **extra: Any) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised, **extra})


def _check_number(name: str, option: str, value: Any, lo: float, hi: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"sampler {name!r}: {option}={value!r} is not a number") from None
    if not lo <= v <= hi:  # also rejects NaN
        raise UsageError(f"sampler {name!r}: {option}={value!r} must be in [{lo}, {hi}]")
    return v


def _lam(sigma: float) -> float:
    """lambda = -log sigma: half the log-SNR of x = x0 + sigma eps (Lu et al. 2022, sec. 3)."""
    return -math.log(sigma)


# ---------------------------------------------------------------------------------------------
# DDPM and DDIM.
# ---------------------------------------------------------------------------------------------


@sampler("ddpm")
def sample_ddpm(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, eqs. 6-7; Alg. 2).

    Between grid levels t > s (any subset of the training steps: the grid is given), the posterior
    q(x_s | x_t, x0) of x_s = x0 + s eps, x_t = x_s + sqrt(t^2 - s^2) eps' is Gaussian with
        mean = x0 + (s^2 / t^2) (x_t - x0),   var = s^2 (t^2 - s^2) / t^2,
    which is eq. 7 divided by sqrt(alpha_bar_s) (VE view). x0 is replaced by x0_hat = D(x_t, t).
    Equal to DDIM with eta = 1 and to Euler-ancestral: sigma_down = s^2 / t, sigma_up = sqrt(var).
    """
    sig = check_inputs("ddpm", noise, sigmas, cond, rng, needs_rng=True)
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        mean = x0 + (s * s / (t * t)) * (x - x0)  # eq. 7, posterior mean
        std = s * math.sqrt(t * t - s * s) / t  # eq. 7, posterior std (beta_tilde)
        x = mean + std * rng.randn_like(x) if s > 0 else mean  # last step (s = 0): return the mean, x0_hat
    return x


@sampler("ddim")
def sample_ddim(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16), written in sigma-space.

    Dividing eq. 12 by sqrt(alpha_bar_s):
        eps_hat    = (x_t - x0_hat) / t                    "predicted noise"
        sigma_up   = eta * s * sqrt(t^2 - s^2) / t         eq. 16 / sqrt(alpha_bar_s)
        sigma_down = sqrt(s^2 - sigma_up^2)                "direction pointing to x_t"
        x_s        = x0_hat + sigma_down * eps_hat + sigma_up * z
    eta = 0: deterministic, identical to Euler on the probability-flow ODE; eta = 1: DDPM ancestral.
    """
    eta = _check_number("ddim", "eta", eta, 0.0, 1.0)
    sig = check_inputs("ddim", noise, sigmas, cond, rng, needs_rng=eta > 0)
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        eps = (x - x0) / t
        sigma_up = eta * s * math.sqrt(t * t - s * s) / t
        sigma_down = math.sqrt(max(s * s - sigma_up * sigma_up, 0.0))
        x = x0 + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * rng.randn_like(x)
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"), alpha = 1 in VE.
# ---------------------------------------------------------------------------------------------


@sampler("dpm++1")
def sample_dpmpp_1(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                   rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None) -> torch.Tensor:
    """First-order DPM-Solver++ (Lu et al. 2022, eq. 8 with k = 1):

        h = lambda_s - lambda_t,   x_s = (s / t) x_t - (e^{-h} - 1) x0_hat
    (= DDIM with eta = 0, exactly, since e^{-h} = s / t). The step to s = 0 returns x0_hat (h = inf).
    """
    sig = check_inputs("dpm++1", noise, sigmas, cond, rng, needs_rng=False)
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        if s == 0:
            x = x0
            continue
        h = _lam(s) - _lam(t)
        x = (s / t) * x - math.expm1(-h) * x0
    return x


@sampler("dpm++2m")
def sample_dpmpp_2m(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                    rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in lambda = -log sigma.

        x0_i = D(x_i, sigma_i);  h_i = lambda_{i+1} - lambda_i;  r_i = h_{i-1} / h_i
        D_i  = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}             (first step: D_0 = x0_0)
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h_i} - 1) D_i
    The final step to sigma = 0 is first order (lower_order_final): x = x0_hat, one model call per step.
    """
    sig = check_inputs("dpm++2m", noise, sigmas, cond, rng, needs_rng=False)
    x = noise * sig[0]
    x0_prev: Optional[torch.Tensor] = None  # multistep history: local, never stored on an object
    h_prev = 0.0
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        if s == 0:
            x = x0
            continue
        h = _lam(s) - _lam(t)
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (s / t) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@sampler("dpm++2m-sde")
def sample_dpmpp_2m_sde(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                        rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None,
                        s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, the data-prediction solver of the reverse diffusion SDE),
    multistep second order, midpoint form, alpha = 1 in VE:

        h_i = lambda_{i+1} - lambda_i;   r_i = h_{i-1} / h_i
        x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h_i} x_i + (1 - e^{-2 h_i}) x0_i
                  + (1 - e^{-2 h_i}) / (2 r_i) (x0_i - x0_{i-1})          (not on the first step)
                  + sigma_{i+1} sqrt(1 - e^{-2 h_i}) z
    The linear part and the noise are integrated exactly; without the correction term a step is the
    DDPM posterior step (e^{-h} = sigma_{i+1} / sigma_i). Fresh noise at every step washes out part of
    the network's error, which the probability-flow ODE keeps (Karras et al. 2022, sec. 4). The final
    step to sigma = 0 returns x0_hat. s_noise scales z (EDM's S_noise).
    """
    s_noise = _check_number("dpm++2m-sde", "s_noise", s_noise, 0.0)
    sig = check_inputs("dpm++2m-sde", noise, sigmas, cond, rng, needs_rng=True)
    x = noise * sig[0]
    x0_prev: Optional[torch.Tensor] = None
    h_prev = 0.0
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        if s == 0:
            x = x0
            continue
        h = _lam(s) - _lam(t)
        keep = -math.expm1(-2 * h)  # 1 - e^{-2h}
        x = (s / t) * math.exp(-h) * x + keep * x0
        if x0_prev is not None:
            x = x + (keep / (2 * (h_prev / h))) * (x0 - x0_prev)
        x = x + (s * math.sqrt(keep) * s_noise) * rng.randn_like(x)
        x0_prev, h_prev = x0, h
    return x


@sampler("dpm++2s")
def sample_dpmpp_2s(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                    rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) with r = 1/2: single-step second order, deterministic.

        h = lambda_s - lambda_t;   sigma_u = e^{-(lambda_t + r h)} (= sqrt(t s) for r = 1/2)
        u = (sigma_u / t) x - (e^{-r h} - 1) D(x, t)
        D = (1 - 1/(2r)) D(x, t) + 1/(2r) D(u, sigma_u)
        x_s = (s / t) x - (e^{-h} - 1) D
    Two model calls per step; the final step to sigma = 0 is first order (x0_hat): 2 steps - 1 calls.
    """
    sig = check_inputs("dpm++2s", noise, sigmas, cond, rng, needs_rng=False)
    r = 0.5
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        if s == 0:
            x = x0
            continue
        h = _lam(s) - _lam(t)
        sigma_u = t * math.exp(-r * h)
        u = (sigma_u / t) * x - math.expm1(-r * h) * x0
        x0_u = denoiser(u, sigma_u, cond)
        d = (1 - 1 / (2 * r)) * x0 + (1 / (2 * r)) * x0_u
        x = (s / t) * x - math.expm1(-h) * d
    return x


# ---------------------------------------------------------------------------------------------
# Karras et al. 2022 (EDM): Euler and Heun on dx/dsigma = (x - D(x, sigma)) / sigma.
# ---------------------------------------------------------------------------------------------


@sampler("euler")
def sample_euler(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                 rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None) -> torch.Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 lines 4-5 without the correction):

        d = (x_i - D(x_i, sigma_i)) / sigma_i;   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d
    """
    sig = check_inputs("euler", noise, sigmas, cond, rng, needs_rng=False)
    x = noise * sig[0]
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        x0 = denoiser(x, t, cond)
        report(callback, x, i, t, x0)
        d = (x - x0) / t  # eq. 3: dx/dsigma
        x = x + (s - t) * d
    return x


@sampler("heun")
def sample_heun(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1; with churn > 0, the stochastic Alg. 2).

        gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
        sigma_hat = (1 + gamma_i) sigma_i;  x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
        d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat;  x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
        if sigma_{i+1} != 0:  d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1}
                              x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2
    The last step (to sigma = 0) is an Euler step: 2 steps - 1 model calls. Churn 0 is deterministic;
    churn > 0 needs rng. The callback gets x_hat, sigma_i and also "sigma_hat".
    """
    s_churn = _check_number("heun", "s_churn", s_churn, 0.0)
    s_tmin = _check_number("heun", "s_tmin", s_tmin, 0.0)
    s_tmax = _check_number("heun", "s_tmax", s_tmax, s_tmin, math.inf)
    s_noise = _check_number("heun", "s_noise", s_noise, 0.0)
    sig = check_inputs("heun", noise, sigmas, cond, rng, needs_rng=s_churn > 0)
    n = len(sig) - 1
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    x = noise * sig[0]
    for i in range(n):
        t, s = sig[i], sig[i + 1]
        gamma = gamma_max if s_tmin <= t <= s_tmax else 0.0
        t_hat = t * (1 + gamma)
        if gamma > 0:  # Alg. 2 lines 5-6: raise the noise level to sigma_hat
            x = x + math.sqrt(t_hat * t_hat - t * t) * s_noise * rng.randn_like(x)
        x0 = denoiser(x, t_hat, cond)
        report(callback, x, i, t, x0, sigma_hat=t_hat)
        d = (x - x0) / t_hat
        x_next = x + (s - t_hat) * d
        if s > 0:  # Alg. 2 lines 9-11: second-order correction
            d2 = (x_next - denoiser(x_next, s, cond)) / s
            x_next = x + (s - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x
