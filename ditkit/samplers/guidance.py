"""Classifier-free guidance as a wrapper around any denoiser (Ho & Salimans 2022; docs/DESIGN.md contract 2).

    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))

The conditional and unconditional halves run in ONE batched forward on Condition.cat(cond, null).
The result is a plain `Denoiser`, so every sampler uses it unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..condition import Condition
from ..errors import UsageError
from ..objectives.base import Denoiser

Scale = Union[float, torch.Tensor]
# How the scale varies along the noise level. "constant": w at every sigma. "ramp": w(sigma) = 1 + 2 (w - 1) / (1 + sigma),
# from no guidance at pure noise to 2w - 1 at the data; on the linear interpolant 1 / (1 + sigma) = 1 - t, so the
# scale grows linearly as sampling proceeds and its mean over t is w (a "linearly increasing" schedule: Wang et
# al. 2024, "Analysis of classifier-free guidance weight schedulers").
SCHEDULES = ("constant", "ramp")


def _check_scale(scale: Scale) -> Union[float, torch.Tensor]:
    if isinstance(scale, torch.Tensor):
        if scale.ndim > 1 or scale.is_complex():
            raise UsageError(f"guidance scale must be a float or a (B,) tensor, got shape {tuple(scale.shape)}")
        s = scale.detach().to(torch.float64)
        if bool(torch.isnan(s).any()) or bool((s < 0).any()) or bool(torch.isinf(s).any()):
            raise UsageError(f"guidance scale must be finite and >= 0 (1 = no guidance), got {scale.tolist()}")
        return s if s.ndim == 1 else float(s)
    try:
        v = float(scale)
    except (TypeError, ValueError):
        raise UsageError(f"guidance scale {scale!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):
        raise UsageError(f"guidance scale {scale!r} must be finite and >= 0 (1 = no guidance)")
    return v


def check_interval(interval) -> Optional[tuple[float, float]]:
    """(sigma_lo, sigma_hi) as floats, or None; a UsageError unless 0 <= sigma_lo < sigma_hi (hi may be inf)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise UsageError(f"guidance interval {interval!r} must be a pair (sigma_lo, sigma_hi)") from None
    if not (0 <= lo < hi):  # also rejects NaN; hi may be inf
        raise UsageError(f"guidance interval {interval!r} must satisfy 0 <= sigma_lo < sigma_hi")
    return lo, hi


def parse_interval(value, flag: str = "--guidance-interval") -> tuple[float, float]:
    """'LO,HI' (as on a command line or in a YAML file; HI may be inf) or a (lo, hi) pair -> (sigma_lo,
    sigma_hi); a UsageError naming `flag` and the form otherwise."""
    pair = value.split(",") if isinstance(value, str) else value
    try:
        return check_interval(pair)
    except UsageError:
        raise UsageError(f"{flag} {value!r}: give SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI, "
                         "e.g. 0.6,inf") from None


def in_band(sigma: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """(B,) bool: the images whose noise level lies in band = (sigma_lo, sigma_hi), both ends included."""
    sg = sigma.detach().to(torch.float64)
    return (sg >= band[0]) & (sg <= band[1])


def check_schedule(schedule: str) -> str:
    """The schedule's name, or a UsageError naming the allowed ones (guided() and validate_sampling)."""
    if schedule not in SCHEDULES:
        raise UsageError(f"guidance schedule {schedule!r}: allowed {', '.join(SCHEDULES)}")
    return schedule


def guided(denoiser: Denoiser, scale: Scale, interval: Optional[tuple[float, float]] = None,
           schedule: str = "constant") -> Denoiser:
    """The classifier-free-guided denoiser.

    scale: a float, or a (B,) tensor of per-image scales (a server mixes requests in one batch);
      1 is the conditional model exactly, 0 the unconditional one; NaN / negative -> UsageError.
    interval: (sigma_lo, sigma_hi): guide only where sigma_lo <= sigma <= sigma_hi and use the
      conditional prediction elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").
    schedule: "constant" or "ramp" (see SCHEDULES): the scale at each image's own sigma.
    Images that need no guidance (scale 1, or sigma outside the interval) get the conditional prediction
    bit for bit, and the unconditional half is run only for the images that do need it (none: one plain
    conditional forward).
    """
    w_all = _check_scale(scale)
    band = check_interval(interval)
    ramp = check_schedule(schedule) == "ramp"
    memo: dict = {}  # this wrapper's own: the (cond, null) pair of the condition it last saw

    def both_halves(cond: Condition) -> Condition:
        if memo.get("cond") is not cond:  # samplers pass the same Condition at every step
            try:
                memo.update(cond=cond, both=Condition.cat(cond, cond.null()))
            except ValueError as e:
                raise UsageError(f"classifier-free guidance needs a null condition: {e}") from None
        return memo["both"]

    def fn(x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        B = x.shape[0]
        if (not isinstance(w_all, torch.Tensor) and w_all != 1 and band is None and not ramp
                and (cond.labels is not None or cond.tokens is not None)):
            # One scale for every image and no interval (ditkit sample, a single request): the same
            # arithmetic as below, without the bookkeeping - one image's latency is dispatch-bound.
            out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both_halves(cond))
            d_c, d_u = out[:B], out[B:]
            w = memo.get(x.dtype)
            if w is None:
                w = memo[x.dtype] = torch.tensor(w_all, dtype=torch.float64).to(x.dtype)
            return d_u + w * (d_c - d_u)
        if isinstance(w_all, torch.Tensor):
            if w_all.shape[0] != B:
                raise UsageError(f"guidance scale has {w_all.shape[0]} entries for a batch of {B} images")
            w = w_all.to(device=x.device)
        else:
            w = torch.full((B,), w_all, dtype=torch.float64, device=x.device)
        if ramp:
            w = 1 + 2 * (w.to(torch.float64) - 1) / (1 + sigma.detach().to(device=w.device, dtype=torch.float64))
        need = w != 1  # (B,) images whose output differs from the conditional prediction
        if band is not None:
            need = need & in_band(sigma, band)
        if cond.labels is None and cond.tokens is None:
            need = torch.zeros_like(need)  # no condition: null == cond, so D_u == D_c and guidance is a no-op
        if not bool(need.any()):
            return denoiser(x, sigma, cond)
        idx = need.nonzero().squeeze(1)  # (K,) images that need the unconditional half
        try:
            null = cond.null() if bool(need.all()) else cond.null().index(idx)
        except ValueError as e:
            raise UsageError(f"classifier-free guidance needs a null condition: {e}") from None
        all_rows = bool(need.all())
        x_u = x if all_rows else x[idx]
        s_u = sigma if all_rows else sigma[idx]
        out = denoiser(torch.cat([x, x_u]), torch.cat([sigma, s_u]), Condition.cat(cond, null))  # one forward
        d_c, d_u = out[:B], out[B:]
        d_c_need = d_c if all_rows else d_c[idx]
        wk = w[idx].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        g = d_u + wk * (d_c_need - d_u)  # (K, C, H, W)
        res = d_c.clone()
        res[idx] = g
        return res

    return denoiser.wrap(fn)


def autoguided(denoiser: Denoiser, weak: Denoiser, scale: Scale,
               interval: Optional[tuple[float, float]] = None) -> Denoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):

        D_w(x, sigma, c) = D_weak(x, sigma, c) + w (D(x, sigma, c) - D_weak(x, sigma, c))

    `weak` is a worse model of the same data and condition: here, by default, the same network earlier in
    its training. Its errors resemble the good model's, so extrapolating away from them sharpens images
    without CFG's pull towards a few prototypes of each class. scale: a float or a (B,) tensor; 1 is
    `denoiser` exactly (the weak model is then not run); NaN / negative -> UsageError. Both models see
    the same condition, so it works for unconditional models too. `denoiser` may itself be a `guided` one.
    interval: (sigma_lo, sigma_hi): guide only there, as `guided` does (Kynkäänniemi et al. 2024); outside
    it an image gets `denoiser`'s own prediction bit for bit, and the weak model runs only for the images
    inside it.
    """
    w_all = _check_scale(scale)
    band = check_interval(interval)
    if (weak.path is None) != (denoiser.path is None):
        raise UsageError("autoguidance: the weak model must use the same kind of objective as the model")
    per_image = isinstance(w_all, torch.Tensor)
    if not per_image and w_all == 1:
        return denoiser  # the model itself, and the weak model is never run
    off = (w_all == 1) if per_image else None  # (B,) images that get D's own bits, also in a mixed batch
    all_off = per_image and bool(off.all())

    def fn(x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        if per_image:
            if w_all.shape[0] != x.shape[0]:
                raise UsageError(f"autoguidance scale has {w_all.shape[0]} entries for a batch of {x.shape[0]} images")
            if all_off:
                return denoiser(x, sigma, cond)
            w = w_all.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        else:
            w = torch.tensor(w_all, dtype=torch.float64).to(x.dtype)
        rows = None  # every image is guided
        if band is not None:
            inside = in_band(sigma, band)
            if not bool(inside.any()):
                return denoiser(x, sigma, cond)
            if not bool(inside.all()):  # a batch of images at different noise levels (a server's)
                rows = inside.nonzero().squeeze(1)
        d_good = denoiser(x, sigma, cond)
        if rows is None:
            return _extrapolate(d_good, weak(x, sigma, cond), w, off)
        out = d_good.clone()
        out[rows] = _extrapolate(d_good[rows], weak(x[rows], sigma[rows], cond.index(rows)),
                                 w[rows] if per_image else w, None if off is None else off[rows])
        return out

    return denoiser.wrap(fn)


def _extrapolate(d_good: torch.Tensor, d_weak: torch.Tensor, w: torch.Tensor,
                 off: Optional[torch.Tensor]) -> torch.Tensor:
    """D_weak + w (D - D_weak); the images flagged in `off` (scale 1) get D's own bits."""
    out = d_weak + w * (d_good - d_weak)
    return out if off is None else torch.where(off.to(out.device).view_as(w), d_good, out)
