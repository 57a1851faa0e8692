"""Stochastic-interpolant objectives (SiT: Ma et al. 2024; rectified flow: Liu et al. 2022).

x_t = alpha(t) x0 + s(t) eps on t in [0, 1] (t = 0 data, t = 1 noise), a network that predicts the
velocity v = alpha'(t) x0 + s'(t) eps (or the noise, or the data), and a denoiser adapter so every
sigma-space sampler runs on it unchanged: sigma = s/alpha, x = x_t / alpha (docs/DESIGN.md contract 1).

Paths:  linear  alpha = 1 - t,          s = t            (rectified flow)
        gvp     alpha = cos(pi t / 2),  s = sin(pi t / 2)  (generalised VP: alpha^2 + s^2 = 1)
        vp      alpha = exp(-1/4 t^2 (b1 - b0) - 1/2 t b0), s = sqrt(1 - alpha^2)  (Song et al. 2021,
                continuous-time DDPM with beta(t) = b0 + t (b1 - b0), b0 = 0.1, b1 = 20)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ..condition import Condition
from ..errors import UsageError
from .base import (KARRAS_SIGMA_MAX, DataMean, Denoiser, Dispersion, Path, batch_noise, karras_sigmas, loglinear_sigmas,
                   loss_inputs, stable_target_x0, stratified_uniforms)

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "data")
TIME_SAMPLING = ("uniform", "logit-normal")
SPACINGS = ("uniform", "karras", "logsnr")
TIME_SCALE = 1000.0  # the network sees 1000 t, the same range as DDPM's integer timesteps


def make_path(name: str, t_eps: float = 1e-3) -> Path:
    """The path `name` with the time range over which sigma = s/alpha stays finite and positive."""
    if name == "linear":
        return Path("linear", alpha=lambda t: 1 - t, s=lambda t: t, d_alpha=lambda t: -torch.ones_like(t),
                    d_s=lambda t: torch.ones_like(t), t_of_sigma=lambda sg: sg / (1 + sg),
                    t_min=0.0, t_max=1.0 - t_eps)
    if name == "gvp":
        h = math.pi / 2
        return Path("gvp", alpha=lambda t: torch.cos(h * t), s=lambda t: torch.sin(h * t),
                    d_alpha=lambda t: -h * torch.sin(h * t), d_s=lambda t: h * torch.cos(h * t),
                    t_of_sigma=lambda sg: torch.atan(sg) / h, t_min=0.0, t_max=1.0 - t_eps)
    if name == "vp":
        b0, b1 = 0.1, 20.0
        log_a = lambda t: -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0  # noqa: E731
        d_log_a = lambda t: -0.5 * t * (b1 - b0) - 0.5 * b0  # noqa: E731

        def t_of_sigma(sg: torch.Tensor) -> torch.Tensor:
            # alpha = (1 + sigma^2)^-1/2  =>  1/4 (b1-b0) t^2 + 1/2 b0 t - 1/2 log(1 + sigma^2) = 0
            a, b, c = 0.25 * (b1 - b0), 0.5 * b0, -0.5 * torch.log1p(sg ** 2)
            return (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)

        alpha = lambda t: torch.exp(log_a(t))  # noqa: E731
        s = lambda t: torch.sqrt(-torch.expm1(2 * log_a(t)))  # noqa: E731
        return Path("vp", alpha=alpha, s=s, d_alpha=lambda t: d_log_a(t) * alpha(t),
                    d_s=lambda t: -d_log_a(t) * alpha(t) ** 2 / s(t), t_of_sigma=t_of_sigma,
                    t_min=t_eps, t_max=1.0)
    raise UsageError(f"--objective path {name!r}: allowed {', '.join(PATHS)}")


class InterpolantObjective:
    default_spacing = "uniform"

    def __init__(self, *, path: str = "linear", prediction: str = "velocity", time_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, loss_weighting: Optional[str] = None,
                 label_dropout: float = 0.1, train_guidance: float = 1.0, data_mean: Any = None,
                 dispersive: float = 0.0, dispersive_block: Optional[int] = None, stratified_time: bool = False,
                 stable_target: int = 0):
        if prediction not in PREDICTIONS:
            raise UsageError(f"--prediction {prediction!r} for the {path} objective: allowed {', '.join(PREDICTIONS)}")
        if time_sampling not in TIME_SAMPLING:
            raise UsageError(f"--time-sampling {time_sampling!r}: allowed {', '.join(TIME_SAMPLING)}")
        if loss_weighting not in (None, "none", "snr-velocity"):
            raise UsageError(f"--loss-weighting {loss_weighting!r}: allowed none, snr-velocity")
        if not 0.0 <= label_dropout < 1.0:
            raise UsageError(f"--label-dropout {label_dropout}: must be in [0, 1)")
        if isinstance(stable_target, bool) or not isinstance(stable_target, int) or stable_target < 0:
            raise UsageError(f"--stable-target {stable_target!r}: must be a whole number >= 0 (reference images "
                             "a step; 0 = off)")
        if not logit_std > 0:
            raise UsageError(f"--logit-std {logit_std}: must be > 0")
        if not (math.isfinite(train_guidance) and train_guidance >= 1):
            raise UsageError(f"--train-guidance {train_guidance}: must be a number >= 1 (1 = off)")
        if train_guidance != 1 and label_dropout <= 0:
            raise UsageError(f"--train-guidance {train_guidance} needs the unconditional model: "
                             "give --label-dropout > 0")
        self.name = path
        self.path = make_path(path)
        self.prediction = prediction
        self.time_sampling = time_sampling
        self.stratified_time = bool(stratified_time)
        self.stable_target = stable_target  # reference images a step for `base.stable_target_x0` (0 = off)
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.loss_weighting = None if loss_weighting == "none" else loss_weighting
        self.label_dropout = label_dropout
        self.train_guidance = train_guidance
        self.centring = DataMean(data_mean)  # off unless a mean image is given (base.DataMean)
        self.dispersion = Dispersion(dispersive, dispersive_block)  # off by default (base.Dispersion)

    def config(self) -> dict[str, Any]:
        return dict(name=self.name, prediction=self.prediction, time_sampling=self.time_sampling,
                    logit_mean=self.logit_mean, logit_std=self.logit_std, loss_weighting=self.loss_weighting,
                    label_dropout=self.label_dropout,
                    # written only when on: runs from before it existed resume unchanged
                    **({"train_guidance": self.train_guidance} if self.train_guidance != 1 else {}),
                    **({"stratified_time": True} if self.stratified_time else {}),
                    **({"stable_target": self.stable_target} if self.stable_target else {}),
                    **self.centring.config(), **self.dispersion.config())

    @property
    def sigma_min(self) -> float:
        return float(self.path.sigma_of_t(torch.tensor(max(self.path.t_min, 1e-3), dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.path.sigma_of_t(torch.tensor(self.path.t_max, dtype=torch.float64)))

    # -- training ----------------------------------------------------------------------------------
    def sample_t(self, B: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        p = self.path
        strata = stratified_uniforms(B, generator) if self.stratified_time else None  # one draw per stratum
        if self.time_sampling == "uniform":
            u = torch.rand(B, generator=generator, dtype=torch.float64) if strata is None else strata
        else:  # logit-normal (Esser et al. 2024, SD3 sec. 3.1); stratified: the normal's inverse CDF of the strata
            z = (torch.randn(B, generator=generator, dtype=torch.float64) if strata is None
                 else math.sqrt(2.0) * torch.erfinv(2.0 * strata - 1.0))
            u = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return p.t_min + (p.t_max - p.t_min) * u

    def sample_noise(self, B: int, shape: tuple[int, ...], generator: Optional[torch.Generator] = None) -> dict:
        """All the randomness of one training batch (`base.batch_noise`)."""
        t = self.sample_t(B, generator)  # (B,) float64, one t per sample
        return batch_noise(t, shape, self.label_dropout, generator)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Condition, noise: Optional[dict] = None,
             generator: Optional[torch.Generator] = None,
             reference: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
             reduce: bool = True) -> torch.Tensor:
        """The batch's mean squared error against the objective's target (reduce=False: each row's, (B,)).
        `reference` (images (M, C, H, W) in the data range, their labels (M,) or None), given with
        `stable_target`: the target is built from each row's posterior mean of x0 over its own x0 and these
        images (`base.stable_target_x0`) instead of its own x0 alone; without it, the usual target."""
        B = x0.shape[0]
        dev = x0.device
        noise, eps, cond, x0 = loss_inputs(self, x0, cond, noise, generator)
        t64 = noise["t"]
        p = self.path
        col = lambda f: f(t64).to(dev, x0.dtype).view(B, 1, 1, 1)  # noqa: E731
        a, s = col(p.alpha), col(p.s)
        x_t = a * x0 + s * eps
        out, dispersive = self.dispersion.predict(net, x_t, (t64 * TIME_SCALE).to(dev, x0.dtype), cond.to(dev))
        if reference is not None and self.stable_target:
            # the target of the posterior mean of x0 at the same x_t = a x0_hat + s eps_hat (eps_hat written
            # as a correction of eps: exactly eps where x0_hat is x0, however small s is)
            x0_hat = stable_target_x0(x0, eps, a, s, cond, self.centring.centre(reference[0].to(dev, x0.dtype)),
                                      reference[1])
            eps, x0 = eps + a * (x0 - x0_hat) / s.clamp(min=1e-12), x0_hat
        if self.prediction == "velocity":
            target = col(p.d_alpha) * x0 + col(p.d_s) * eps
        else:
            target = eps if self.prediction == "noise" else x0
        if self.train_guidance != 1 and cond.labels is not None:
            target = self._guided_target(net, out, target, x_t, t64, cond, noise["drop"])
        per_sample = (out - target).pow(2).flatten(1).mean(1)
        if self.loss_weighting == "snr-velocity":  # down-weight the near-noise end
            per_sample = per_sample * (a.view(B) ** 2 / (a.view(B) ** 2 + s.view(B) ** 2))
        if not reduce:  # (B,): the rows' own losses (a dispersive term, the batch's, left out)
            return per_sample
        return per_sample.mean() + dispersive

    def _guided_target(self, net: nn.Module, out: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor,
                       t64: torch.Tensor, cond: Condition, drop: torch.Tensor) -> torch.Tensor:
        """Model guidance (Tang et al. 2025, "Diffusion models without classifier-free guidance"): the
        conditional rows learn target + w (D(x, c) - D(x, null)), both predictions the network's own
        without gradient. Its fixed point is D(x, c) = D_u + S (D_c - D_u) with S = 1 / (1 - w): the
        classifier-free-guided prediction at scale S = train_guidance, in one evaluation at sampling."""
        w = 1.0 - 1.0 / self.train_guidance
        dev = x_t.device
        with torch.no_grad():
            out_u = net(x_t, (t64 * TIME_SCALE).to(dev, x_t.dtype), cond.null().to(dev))
        keep = (~drop).to(dev).view(-1, *([1] * (target.dim() - 1)))
        guided = target + w * (out.detach().to(target.dtype) - out_u.to(target.dtype))
        return torch.where(keep, guided, target)

    # -- conversions: exact inverses of each other (tested) ----------------------------------------
    def x0_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The data prediction from the network output at x_t, time t (B,)."""
        p = self.path
        v = lambda f: f(t).view(-1, 1, 1, 1).to(x_t.dtype)  # noqa: E731
        a, s = v(p.alpha), v(p.s)
        if self.prediction == "data":
            return out
        if self.prediction == "noise":
            return (x_t - s * out) / a
        da, ds = v(p.d_alpha), v(p.d_s)
        # Solve [x_t; v] = [[a, s], [da, ds]] [x0; eps] for x0.
        return (ds * x_t - s * out) / (ds * a - s * da)

    def output_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output that corresponds to data prediction x0 at x_t, time t (inverse of above)."""
        p = self.path
        v = lambda f: f(t).view(-1, 1, 1, 1).to(x_t.dtype)  # noqa: E731
        a, s = v(p.alpha), v(p.s)
        eps = (x_t - a * x0) / s
        if self.prediction == "data":
            return x0
        if self.prediction == "noise":
            return eps
        return v(p.d_alpha) * x0 + v(p.d_s) * eps

    def denoiser(self, net: nn.Module) -> Denoiser:
        p = self.path

        def fn(x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
            t = p.t_of_sigma(sigma.double()).clamp(p.t_min, p.t_max)  # (B,) float64
            a = p.alpha(t).view(-1, 1, 1, 1).to(x.dtype)
            x_t = a * x
            out = net(x_t, (t * TIME_SCALE).to(x.dtype), cond)
            return self.x0_from_output(out, x_t, t.to(x.dtype))

        return Denoiser(self.centring.wrap(fn), sigma_min=self.sigma_min, sigma_max=self.sigma_max, path=p)

    def sigma_grid(self, steps: int, spacing: str = "uniform") -> torch.Tensor:
        """Decreasing float64 noise levels, length steps + 1, ending in 0. 'uniform' is uniform in t."""
        if steps < 1:
            raise UsageError(f"--steps {steps}: must be >= 1")
        if spacing == "karras":
            return karras_sigmas(steps, self.sigma_min, min(self.sigma_max, KARRAS_SIGMA_MAX))
        if spacing == "logsnr":
            return loglinear_sigmas(steps, self.sigma_min, self.sigma_max)
        if spacing != "uniform":
            raise UsageError(f"--spacing {spacing!r} for an interpolant objective: allowed {', '.join(SPACINGS)}")
        p = self.path
        t = torch.linspace(p.t_max, p.t_min, steps + 1, dtype=torch.float64)
        sig = p.sigma_of_t(t)
        sig[-1] = 0.0
        return sig
