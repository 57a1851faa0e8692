"""Time-domain samplers for continuous-time Gaussian paths x_t = alpha(t) x0 + s(t) eps (SiT, Ma et al. 2024).

They need the objective's `Path` (`denoiser.path`) and build every field from the denoiser alone:

    x_tilde = x_t / alpha(t),  sigma = s(t) / alpha(t),  x0_hat = D(x_tilde, sigma),
    eps_hat = (x_tilde - x0_hat) / sigma,
    velocity v(x_t, t) = alpha'(t) x0_hat + s'(t) eps_hat,    score(x_t, t) = -eps_hat / s(t).

The time grid is t_i = path.t_of_sigma(sigmas[i]) (the final sigma = 0 is t = 0); sampling starts at
x_t = s(t_0) * noise. The shared signature, rng and callback rules are those of `continuous.py`; the
callback's "x" is the sigma-space state x_t / alpha(t) (as for every other sampler) and it also gets
"t" and "x_t".
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..condition import Condition
from ..errors import DitkitError, UsageError
from ..objectives.base import Denoiser, Path
from ..utils import ImageRNG
from .continuous import Callback, _check_number, check_inputs, report, sampler

DIFFUSIONS = ("sbdm", "sigma", "linear", "constant")
ODE_METHODS = ("RK45", "RK23", "DOP853")  # explicit: an implicit method would need a D x D Jacobian


def _path(denoiser: Denoiser, name: str) -> Path:
    if getattr(denoiser, "path", None) is None:
        raise UsageError(f"sampler {name!r} integrates in time and needs a continuous-time objective "
                         "(denoiser.path, e.g. the interpolant objective); this denoiser has no path - "
                         "use a sigma-space sampler (euler, heun, ddim, dpm++2m, ...)")
    return denoiser.path


def _coefs(path: Path, t: float) -> tuple[float, float, float, float]:
    """alpha, s, alpha', s' at time t as Python floats (float64)."""
    tt = torch.tensor(t, dtype=torch.float64)
    return float(path.alpha(tt)), float(path.s(tt)), float(path.d_alpha(tt)), float(path.d_s(tt))


def _time_grid(path: Path, sig: list[float], name: str) -> list[float]:
    """t_i = t_of_sigma(sigma_i) for the positive sigmas, then t = 0; checked against the path's range."""
    ts = path.t_of_sigma(torch.tensor(sig[:-1], dtype=torch.float64)).tolist() + [0.0]
    tol = 1e-9
    if ts[0] > path.t_max + tol or ts[-2] < path.t_min - tol or any(b >= a for a, b in zip(ts, ts[1:])):
        raise UsageError(f"sampler {name!r}: sigmas map to times [{ts[-2]:.6g}, {ts[0]:.6g}] outside the path's "
                         f"range [{path.t_min}, {path.t_max}] (or not decreasing); build the grid from the objective")
    return ts


def _fields(denoiser: Denoiser, path: Path, x_t: torch.Tensor, t: float, cond: Condition):
    """(x0_hat, eps_hat, sigma) at x_t, time t, from the denoiser (module docstring)."""
    a, s, _, _ = _coefs(path, t)
    sigma = s / a
    x_tilde = x_t / a
    x0 = denoiser(x_tilde, sigma, cond)
    eps = (x_tilde - x0) / sigma
    return x0, eps, sigma


def _diffusion(kind: str, t: float, a: float, s: float, da: float, ds: float) -> float:
    """w(t), the free diffusion coefficient of SiT's SDE (Ma et al. 2024, sec. 2.3 / eq. 9)."""
    if kind == "sbdm":  # g(t)^2 of the forward SDE dx = (alpha'/alpha) x dt + g dW (= DDPM on a VP path)
        return 2.0 * (s * ds - (da / a) * s * s)
    if kind == "sigma":
        return s
    if kind == "linear":
        return 1.0 - t
    return 1.0  # constant


@sampler("euler-maruyama")
def sample_euler_maruyama(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                          rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None,
                          diffusion: str = "sbdm", diffusion_scale: float = 1.0) -> torch.Tensor:
    """Euler-Maruyama on SiT's reverse-time SDE (Ma et al. 2024, eq. 9; Song et al. 2021, eq. 6):

        dX = [v(X, t) - 1/2 w(t) score(X, t)] dt + sqrt(w(t)) dW_bar,    t: t_0 -> t_{N-1}, dt < 0
        X_{i+1} = X_i + [v - 1/2 w score] (t_{i+1} - t_i) + sqrt(w |t_{i+1} - t_i|) z
    For any w >= 0 the marginals are those of the path (the -1/2 w score term undoes the added noise;
    w = 0 is the probability-flow ODE). The last step does not add noise: it returns x0_hat from X_{N-1}
    (SiT's last-step denoising), so N steps cost N model calls.
    diffusion: "sbdm" w = 2 (s s' - (alpha'/alpha) s^2) (the DDPM reverse SDE on a VP path),
               "sigma" w = s(t), "linear" w = 1 - t, "constant" w = 1; all times `diffusion_scale`.
    """
    name = "euler-maruyama"
    if diffusion not in DIFFUSIONS:
        raise UsageError(f"sampler {name!r}: diffusion={diffusion!r}; allowed: {', '.join(DIFFUSIONS)}")
    scale = _check_number(name, "diffusion_scale", diffusion_scale, 0.0)
    path = _path(denoiser, name)
    sig = check_inputs(name, noise, sigmas, cond, rng, needs_rng=scale > 0)
    ts = _time_grid(path, sig, name)
    n = len(ts) - 1
    x = _coefs(path, ts[0])[1] * noise  # x_{t_0} = s(t_0) * noise
    for i in range(n - 1):
        t, t_next = ts[i], ts[i + 1]
        a, s, da, ds = _coefs(path, t)
        x0, eps, sigma = _fields(denoiser, path, x, t, cond)
        report(callback, x / a, i, sigma, x0, t=t, x_t=x)
        w = scale * _diffusion(diffusion, t, a, s, da, ds)
        if w < 0:
            raise UsageError(f"sampler {name!r}: diffusion {diffusion!r} is negative at t={t:.6g} on path "
                             f"{path.name!r} (sigma(t) must increase); choose another diffusion")
        v = da * x0 + ds * eps  # velocity
        score = -eps / s
        dt = t_next - t  # < 0: reverse time
        x = x + (v - 0.5 * w * score) * dt
        if w > 0:
            x = x + math.sqrt(w * -dt) * rng.randn_like(x)
    t = ts[n - 1]
    a = _coefs(path, t)[0]
    x0, _, sigma = _fields(denoiser, path, x, t, cond)  # final denoising step
    report(callback, x / a, n - 1, sigma, x0, t=t, x_t=x)
    return x0


@sampler("adaptive")
def sample_adaptive(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond: Condition,
                    rng: Optional[ImageRNG] = None, callback: Optional[Callback] = None, method: str = "RK45",
                    rtol: float = 1e-3, atol: float = 1e-3, nfe_out: Optional[dict] = None) -> torch.Tensor:
    """Adaptive probability-flow ODE dX/dt = v(X, t) (Song et al. 2021, eq. 13; SiT's ODE sampler).

    Solved with scipy.integrate.solve_ivp (`method` RK45 / RK23 / DOP853, `rtol`, `atol`) from
    t_0 = t(sigmas[0]) to t_end = max(path.t_min, t(sigmas[-2])) (the grid's smallest positive noise
    level; the grid's interior points are ignored), then returns x0_hat = D at t_end.

    The whole batch is one float64 vector, so the step sizes (and hence each image's trajectory) depend
    on the whole batch: an image matches its value under another batching only to within the tolerance,
    not bit for bit (unlike every fixed-grid sampler).

    NFE is not known in advance (the registry says None). It is reported in two ways: every model call
    reaches the callback with "nfe" (calls so far, the final x0_hat call included; "i" is the call index),
    and, if a dict is passed as `nfe_out`, nfe_out["nfe"] is set to the total when sampling ends.
    """
    name = "adaptive"
    if method not in ODE_METHODS:
        raise UsageError(f"sampler {name!r}: method={method!r}; allowed: {', '.join(ODE_METHODS)}")
    rtol = _check_number(name, "rtol", rtol, 0.0)
    atol = _check_number(name, "atol", atol, 0.0)
    if rtol <= 0 or atol <= 0:
        raise UsageError(f"sampler {name!r}: rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    if nfe_out is not None and not isinstance(nfe_out, dict):
        raise UsageError(f"sampler {name!r}: nfe_out must be a dict (filled with 'nfe') or None")
    path = _path(denoiser, name)
    sig = check_inputs(name, noise, sigmas, cond, rng, needs_rng=False)
    ts = _time_grid(path, sig, name)
    t0, t_end = ts[0], max(path.t_min, ts[-2])
    shape, dtype, device = noise.shape, noise.dtype, noise.device
    nfe = 0

    def evaluate(x_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal nfe
        x0, eps, sigma = _fields(denoiser, path, x_t, t, cond)
        nfe += 1
        report(callback, x_t / _coefs(path, t)[0], nfe - 1, sigma, x0, t=t, x_t=x_t, nfe=nfe)
        return x0, eps

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        x_t = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        _, _, da, ds = _coefs(path, float(t))
        x0, eps = evaluate(x_t, float(t))
        return (da * x0 + ds * eps).detach().to("cpu", torch.float64).reshape(-1).numpy()

    x = _coefs(path, t0)[1] * noise.detach().to("cpu", torch.float64)  # x_{t_0} = s(t_0) * noise, float64
    y = x.reshape(-1).numpy()
    if t0 > t_end:
        from scipy.integrate import solve_ivp  # here, not at import: scipy.integrate costs every process 0.7 s

        sol = solve_ivp(velocity, (t0, t_end), y, method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise DitkitError(f"sampler {name!r}: the ODE solver failed: {sol.message}")
        y = sol.y[:, -1]
    x_end = torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(device=device, dtype=dtype)
    x0, _ = evaluate(x_end, t_end)  # final denoising step
    if nfe_out is not None:
        nfe_out["nfe"] = nfe
    return x0
