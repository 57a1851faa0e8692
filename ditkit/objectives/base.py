"""The objective contract and the denoiser contract (docs/DESIGN.md contract 1).

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
from typing import Any, Callable, Optional

import torch

from ..condition import Condition
from ..errors import UsageError


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


def dispersive_loss(z: torch.Tensor) -> torch.Tensor:
    """The dispersive loss of Wang & He (2025, "Diffuse and Disperse: Image Generation with Representation
    Regularization"), InfoNCE-L2 form: log of the mean, over every pair (i, j) of the batch (i = j included),
    of exp(-||z_i - z_j||^2 / D), each z_i flattened to D numbers. It is lowest when the batch's
    representations are spread apart; with no positive pairs it adds no target of its own to the regression.
    Computed in fp32 from squared norms and one Gram matrix (no square root: finite gradients at i = j),
    with autocast off: in bf16 the Gram trick's cancellation leaves the diagonal's distances far from 0,
    the term then falls below its true floor log(1 / B), and training learns to inflate the norms."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.float().flatten(1)
        sq = z.pow(2).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp(min=0) / z.shape[1]
        return torch.logsumexp(-d2.flatten(), 0) - math.log(d2.numel())


class Dispersion:
    """An objective's optional dispersive term: `weight * dispersive_loss(tokens after block `block`)`.

    Off (weight 0) by default, and then `config()` writes nothing, so every run from before it existed
    loads and resumes unchanged. On, the network is asked for its hidden tokens (`DiT.forward(...,
    hidden_at=block)`), in the same forward as the prediction. The loss is taken over each process's batch.
    """

    def __init__(self, weight: float = 0.0, block: Optional[int] = None):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise UsageError(f"--dispersive {weight}: must be a number >= 0 (0 = off)")
        if weight > 0 and not (isinstance(block, int) and block >= 1):
            raise UsageError(f"--dispersive-block {block}: must be a block number >= 1")
        self.weight = float(weight)
        self.block = block if weight > 0 else None

    def config(self) -> dict[str, Any]:
        return {"dispersive": self.weight, "dispersive_block": self.block} if self.weight > 0 else {}

    def predict(self, net: Any, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> tuple[torch.Tensor, Any]:
        """(the network's output, the weighted dispersive loss or 0 when off)."""
        if self.weight == 0:
            return net(x_t, t, cond), 0.0
        out, hidden = net(x_t, t, cond, hidden_at=self.block)
        return out, self.weight * dispersive_loss(hidden)


class DataMean:
    """Mean-image centring: the network models x0 - m (m: the training images' mean, (C, H, W)), and the
    denoiser adds m back: D(x, sigma) = m + D'(x - m, sigma). In sigma-space x - m = (x0 - m) + sigma eps,
    so every sampler runs unchanged; an untrained network (x0-prediction 0) already gives the mean image,
    and the network spends its capacity on how a digit differs from the average one. Off (m = None) it is
    the identity, and a config without `data_mean` (every run before it existed) loads as before.

    The mean is stored in the objective's config as nested lists (rounded to 1e-6, which is then the mean
    itself: training and sampling both rebuild it from the config), so a run folder carries it everywhere.
    """

    def __init__(self, value: Any = None):
        self.mean: Optional[torch.Tensor] = None
        self._cast: dict[tuple, torch.Tensor] = {}  # the mean on each (device, dtype) asked for, made once
        if value is None:
            return
        try:
            m = torch.as_tensor(value, dtype=torch.float64)  # float64: config() gives back the stored numbers
        except (TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"objective data_mean: must be a (C, H, W) image of numbers ({e})") from None
        if m.ndim != 3 or m.numel() == 0 or not bool(torch.isfinite(m).all()):
            raise UsageError(f"objective data_mean: must be a finite (C, H, W) image, got shape {tuple(m.shape)}")
        self.mean = m

    @staticmethod
    def stored(mean: torch.Tensor) -> list:
        """A mean image (C, H, W) in the form the config stores: nested lists rounded to 1e-6."""
        return [[[round(float(v), 6) for v in row] for row in ch] for ch in mean]

    def config(self) -> dict[str, Any]:
        """{"data_mean": nested lists} when on, {} when off (old configs stay byte-identical)."""
        return {} if self.mean is None else {"data_mean": self.mean.tolist()}

    def _on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cast:  # not per training step or sampler step
            self._cast[key] = self.mean.to(like.device, like.dtype)
        return self._cast[key]

    def centre(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 - m for a batch (B, C, H, W); a clear error if the images are not the mean's shape."""
        if self.mean is None:
            return x0
        if tuple(x0.shape[1:]) != tuple(self.mean.shape):
            raise UsageError(f"images of shape {tuple(x0.shape[1:])} for an objective centred on a mean image of "
                             f"shape {tuple(self.mean.shape)}: train and sample at the run's image shape")
        return x0 - self._on(x0)

    def wrap(self, fn: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]
             ) -> Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]:
        """The denoiser of uncentred data from `fn`, the denoiser of centred data."""
        if self.mean is None:
            return fn

        def centred(x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
            return fn(self.centre(x), sigma, cond) + self._on(x)

        return centred


# EDM's sigma_max (Karras et al. 2022, sec. 5): above it the data is a negligible part of x = x0 + sigma
# eps, and a Heun step that spans sigma 999 -> 20 (the linear interpolant's range) is unstable: its
# trapezoid averages slopes taken three orders of magnitude apart.
KARRAS_SIGMA_MAX = 80.0


def drop_labels(cond: Condition, drop: torch.Tensor) -> Condition:
    """Replace the labels where `drop` (B,) is True by the null id (trains the unconditional model for CFG);
    a text condition's rows by the empty prompt (caption dropout: `Condition.drop`)."""
    if cond.tokens is not None:
        return cond.drop(drop)
    if cond.labels is None or not bool(drop.any()):
        return cond
    labels = torch.where(drop.to(cond.labels.device), torch.full_like(cond.labels, cond.null_label), cond.labels)
    return Condition(labels=labels, null_label=cond.null_label, batch=len(cond))


def batch_noise(t: torch.Tensor, shape: tuple[int, ...], label_dropout: float,
                generator: Optional[torch.Generator] = None) -> dict:
    """All the randomness of one training batch: the times t (B,), drawn first by the objective, then the
    noise and which labels drop, in this order (a run's random stream, and so its resume, depends on it).
    Drawn up front so that a data-parallel run can draw it for the global batch and slice its share (and
    so match a single-process run)."""
    B = t.shape[0]
    eps = torch.randn((B, *shape), generator=generator)
    drop = torch.rand((B,), generator=generator) < label_dropout
    return dict(t=t, eps=eps, drop=drop)


def stratified_uniforms(B: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """B float64 numbers in [0, 1), one in each of the B strata [k/B, (k+1)/B), the strata in a random
    order: an objective's training times with `stratified_time` (through its time distribution's inverse
    CDF). Stratified (jittered) sampling, a variant of the low-discrepancy times of Kingma et al. (2021,
    "Variational Diffusion Models", appendix I.1, which share one offset u + k/B): each draw is still
    uniform, so the loss stays unbiased, but a batch covers the time range evenly and the variance of its
    loss (and gradient) from the draw of the times drops."""
    u = torch.rand(B, generator=generator, dtype=torch.float64)
    # k + u rounds up to B when u is within an ulp of 1: kept below 1, as the strata promise
    return ((torch.randperm(B, generator=generator).to(torch.float64) + u) / B).clamp_(max=math.nextafter(1.0, 0.0))


def loss_inputs(objective: Any, x0: torch.Tensor, cond: Condition, noise: Optional[dict],
                generator: Optional[torch.Generator]) -> tuple[dict, torch.Tensor, Condition, torch.Tensor]:
    """The start every objective's loss shares: the batch's randomness (drawn now unless given), its noise
    on x0's device and dtype, the dropped labels replaced by the null class, and x0 centred.
    Returns (noise, eps, cond, x0)."""
    if noise is None:
        noise = objective.sample_noise(x0.shape[0], tuple(x0.shape[1:]), generator)
    eps = noise["eps"].to(x0.device, x0.dtype)
    return noise, eps, drop_labels(cond, noise["drop"]), objective.centring.centre(x0)


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


def stable_target_x0(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor, cond: Condition,
                     ref_x: torch.Tensor, ref_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The posterior mean of the data behind each noisy image x_t = a x0 + s eps over a reference set: the
    image's own x0 and the reference images `ref_x` (M, *x0.shape[1:]), each weighted by the likelihood
    p(x_t | x0') = N(a x0', s^2 I) (Xu et al. 2023, "Stable Target Field for Reduced Variance Score
    Estimation in Diffusion Models"). A row with a class only weighs the reference images of its class
    (`ref_labels`); a row without one (dropped label, unconditional model) weighs them all.

    A training target built from this mean instead of the row's own x0 is the average of the conditional
    targets over the set: the same target where the own x0 explains x_t far better than any other (small
    noise), a lower-variance one where many images do (large noise), and, as the set grows, the exact
    regression target of the objective. Log-weights are taken relative to the own x0, so they stay exact at
    small s: log p(x_t | x0') - log p(x_t | x0) = -(a^2 |x0 - x0'|^2 + 2 a s eps.(x0 - x0')) / (2 s^2).
    a, s: (B, 1, ...) broadcastable. Computed in float32 (no autocast); returns x0's shape and dtype.

    The labelled rows are weighed against their class's references only, all classes in one batched
    product (each class's references padded to the largest class, masked), and the label-less rows against
    all references in one more: the cost grows with the references, not with references x classes, and
    the number of operations does not grow with the classes. References may come in any order; sorted by
    class (as `ImageDataset.draw` gives them) they need no sort."""
    B = x0.shape[0]
    with torch.autocast(x0.device.type, enabled=False):
        X, E = x0.reshape(B, -1).float(), eps.reshape(B, -1).float()
        R = ref_x.reshape(ref_x.shape[0], -1).to(X.device, torch.float32)
        av, sv = a.reshape(B, 1).float(), s.reshape(B, 1).float().clamp(min=1e-12)
        XX, EX = (X * X).sum(1, keepdim=True), (E * X).sum(1, keepdim=True)
        RR = (R * R).sum(1)

        def log_weights(rows, XR, ER, RR):
            """log p(x_t | x0') - log p(x_t | x0) for `rows` against references with products XR = x0.x0',
            ER = eps.x0' and squared norms RR."""
            dist2 = (XX[rows] - 2 * XR + RR).clamp_(min=0)  # |x0 - x0'|^2
            a_, s_ = av[rows], sv[rows]
            return -(a_ * a_ * dist2 + 2 * a_ * s_ * (EX[rows] - ER)) / (2 * s_ * s_)

        def weights(logw):
            """Softmax weights over (own x0, references), the own x0 first."""
            return torch.softmax(torch.cat([logw.new_zeros(len(logw), 1), logw], 1), dim=1)

        mean = X.clone()  # a row whose class has no reference keeps its own x0
        if cond.labels is not None and ref_labels is not None:
            labels, ref_labels = cond.labels.to(X.device).view(B), ref_labels.to(X.device).view(-1)
            if len(ref_labels) > 1 and not bool((ref_labels[1:] >= ref_labels[:-1]).all()):
                order = torch.argsort(ref_labels, stable=True)
                R, RR, ref_labels = R[order], RR[order], ref_labels[order]
            free = (labels == cond.null_label).nonzero().squeeze(1)  # dropped labels: every reference
            classes, counts = torch.unique_consecutive(ref_labels, return_counts=True)
            K = len(classes)
            rows = labels[:0]  # the rows whose class has references (none if no reference has a class)
            if K:
                k = torch.searchsorted(classes, labels).clamp_(max=K - 1)  # each row's class among the references'
                rows = (classes[k] == labels).nonzero().squeeze(1)
                kr, by_class = torch.sort(k[rows], stable=True)
                rows = rows[by_class]
            if len(rows):
                # the references padded to (K, C, D): class k's in its first counts[k] places
                C = int(counts.max())
                span = torch.arange(C, device=X.device)
                valid = span < counts[:, None]
                idx = ((torch.cumsum(counts, 0) - counts)[:, None] + span).clamp_(max=len(R) - 1)
                Rp = R[idx]
                # each row's place among its class's rows: the rows padded to (K, 2 x the largest class's rows,
                # D), x0 in the first half, eps in the second
                n_rows = torch.bincount(kr, minlength=K)
                slot = torch.arange(len(rows), device=X.device) - (torch.cumsum(n_rows, 0) - n_rows)[kr]
                half = int(n_rows.max())
                XE = X.new_zeros(K, 2 * half, X.shape[1])
                XE[kr, slot], XE[kr, slot + half] = X[rows], E[rows]
                P = torch.bmm(XE, Rp.transpose(1, 2))  # (K, 2 x rows, C): x0.x0' then eps.x0'
                logw = log_weights(rows, P[kr, slot], P[kr, slot + half], RR[idx][kr])
                w = weights(logw.masked_fill_(~valid[kr], -math.inf))
                Wp = X.new_zeros(K, half, C)
                Wp[kr, slot] = w[:, 1:]
                mean[rows] = w[:, :1] * X[rows] + torch.bmm(Wp, Rp)[kr, slot]
        else:
            free = torch.arange(B, device=X.device)
        if len(free) and len(R):
            P = torch.cat([X[free], E[free]]) @ R.T
            w = weights(log_weights(free, P[:len(free)], P[len(free):], RR))
            mean[free] = w[:, :1] * X[free] + w[:, 1:] @ R
    return mean.view_as(x0).to(x0.dtype)
