"""The DDPM objective (Ho et al. 2020) on a discrete VP schedule, with its denoiser adapter.

Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0..T-1}, t drawn independently
for every sample (the tutorial's one-t-per-batch is a bug: it makes every batch's loss a single-t
estimate). Predictions: eps (Ho et al.), v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022), or
x0. Optional min-SNR-gamma loss weighting (Hang et al. 2023).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ..condition import Condition
from ..errors import UsageError
from .base import (KARRAS_SIGMA_MAX, DataMean, Denoiser, Dispersion, batch_noise, karras_sigmas, loglinear_sigmas,
                   loss_inputs, stratified_uniforms)

PREDICTIONS = ("eps", "v", "x0")
SCHEDULES = ("linear", "cosine")
SPACINGS = ("leading", "trailing", "uniform", "karras", "logsnr")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float64)


class DDPMObjective:
    name = "ddpm"
    stable_target = 0  # the stable target is the interpolants' (InterpolantObjective); none here

    def __init__(self, *, num_timesteps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction: str = "eps", min_snr_gamma: Optional[float] = None,
                 label_dropout: float = 0.1, data_mean: Any = None, dispersive: float = 0.0,
                 dispersive_block: Optional[int] = None, stratified_time: bool = False):
        if prediction not in PREDICTIONS:
            raise UsageError(f"--prediction {prediction!r} for the ddpm objective: allowed {', '.join(PREDICTIONS)}")
        if schedule not in SCHEDULES:
            raise UsageError(f"--schedule {schedule!r}: allowed {', '.join(SCHEDULES)}")
        if num_timesteps < 2:
            raise UsageError(f"--num-timesteps {num_timesteps}: must be >= 2")
        if not 0.0 <= label_dropout < 1.0:
            raise UsageError(f"--label-dropout {label_dropout}: must be in [0, 1)")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise UsageError(f"--min-snr-gamma {min_snr_gamma}: must be > 0")
        self.num_timesteps = T = num_timesteps
        self.schedule = schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = label_dropout
        self.stratified_time = bool(stratified_time)
        self.dispersion = Dispersion(dispersive, dispersive_block)  # off by default (base.Dispersion)
        self.centring = DataMean(data_mean)  # off unless a mean image is given (base.DataMean)
        self.betas = linear_betas(T, beta_start, beta_end) if schedule == "linear" else cosine_betas(T)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_t, float64 (T,)
        # sigma_t = s_t / alpha_t in the VE view; increasing in t.
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    # -- configuration -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return dict(name=self.name, num_timesteps=self.num_timesteps, schedule=self.schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction=self.prediction,
                    min_snr_gamma=self.min_snr_gamma, label_dropout=self.label_dropout, **self.centring.config(),
                    **self.dispersion.config(),
                    # written only when on: runs from before it existed resume unchanged
                    **({"stratified_time": True} if self.stratified_time else {}))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- training ----------------------------------------------------------------------------------
    def sample_noise(self, B: int, shape: tuple[int, ...], generator: Optional[torch.Generator] = None) -> dict:
        """All the randomness of one training batch (`base.batch_noise`)."""
        if self.stratified_time:  # one t in each of B equal slices of the steps (base.stratified_uniforms)
            t = (stratified_uniforms(B, generator) * self.num_timesteps).long()
        else:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator)  # one t per sample
        return batch_noise(t, shape, self.label_dropout, generator)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Condition, noise: Optional[dict] = None,
             generator: Optional[torch.Generator] = None, reference: None = None,
             reduce: bool = True) -> torch.Tensor:
        """Mean loss over the batch (reduce=False: each row's, (B,)); every sample gets its own t (and its own
        noise). `reference` is the interpolants' (their stable target): the same signature, always None here."""
        if reference is not None:
            raise UsageError("--stable-target: for the interpolant objectives (linear, gvp, vp), not ddpm")
        B = x0.shape[0]
        dev = x0.device
        noise, eps, cond, x0 = loss_inputs(self, x0, cond, noise, generator)
        t = noise["t"].to(dev)
        abar = self.alphas_cumprod.to(dev)[t].to(x0.dtype).view(B, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a * x0 + s * eps
        out, dispersive = self.dispersion.predict(net, x_t, t.to(x0.dtype), cond.to(dev))
        target = {"eps": eps, "v": a * eps - s * x0, "x0": x0}[self.prediction]
        per_sample = (out - target).pow(2).flatten(1).mean(1)  # (B,)
        if self.min_snr_gamma is not None:
            snr = (abar / (1 - abar)).view(B)
            clipped = snr.clamp(max=self.min_snr_gamma)
            # Hang et al. 2023: weight on the x0-MSE is min(snr, gamma); convert to this prediction's MSE.
            w = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]
            per_sample = per_sample * w
        if not reduce:  # (B,): the rows' own losses (a dispersive term, the batch's, left out)
            return per_sample
        return per_sample.mean() + dispersive

    # -- sampling ----------------------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a VE sigma, interpolating linearly in log sigma (k-diffusion's way)."""
        log_sigma = sigma.double().clamp(min=self.sigma_min, max=self.sigma_max).log()
        ls = self.log_sigmas.to(sigma.device)
        idx = torch.searchsorted(ls, log_sigma).clamp(1, self.num_timesteps - 1)
        lo, hi = ls[idx - 1], ls[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.dtype)

    def denoiser(self, net: nn.Module) -> Denoiser:
        """The VP eps/v/x0-model as D(x, sigma, cond) (Karras et al. 2022, table 1, "VP" column)."""
        pred = self.prediction

        def fn(x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
            sig = sigma.view(-1, 1, 1, 1).to(x.dtype)
            alpha = 1.0 / (1.0 + sig ** 2).sqrt()  # sqrt(abar_t)
            out = net(x * alpha, self.sigma_to_t(sigma).to(x.dtype), cond)
            if pred == "eps":
                return x - sig * out
            if pred == "v":  # x0 = alpha x_t - s v with x_t = alpha x, s = sigma alpha
                return alpha ** 2 * x - sig * alpha * out
            return out

        return Denoiser(self.centring.wrap(fn), sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def timesteps(self, steps: int, spacing: str = "leading") -> torch.Tensor:
        """`steps` training timesteps, decreasing (DDIM's 'leading', 'trailing' (Lin et al. 2024), 'uniform')."""
        T = self.num_timesteps
        if spacing == "leading":
            ts = torch.arange(0, steps) * (T // steps)
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / steps)).long().flip(0) - 1
        elif spacing == "uniform":
            ts = torch.round(torch.linspace(0, T - 1, steps)).long()
        else:
            raise UsageError(f"spacing {spacing!r} is not a timestep spacing; allowed: leading, trailing, uniform")
        return ts.flip(0)

    def sigma_grid(self, steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Decreasing float64 noise levels, length steps + 1, ending in 0 (the sampler contract)."""
        if not 1 <= steps <= self.num_timesteps:
            raise UsageError(f"--steps {steps}: must be between 1 and the {self.num_timesteps} training steps")
        if spacing == "karras":
            return karras_sigmas(steps, self.sigma_min, min(self.sigma_max, KARRAS_SIGMA_MAX))
        if spacing == "logsnr":
            return loglinear_sigmas(steps, self.sigma_min, self.sigma_max)
        if spacing not in SPACINGS:
            raise UsageError(f"--spacing {spacing!r}: allowed {', '.join(SPACINGS)}")
        ts = self.timesteps(steps, spacing)
        return torch.cat([self.sigmas[ts], torch.zeros(1, dtype=torch.float64)])

    default_spacing = "trailing"  # reaches t = T-1 at any step count (Lin et al. 2024)

