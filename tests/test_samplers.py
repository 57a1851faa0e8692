"""The samplers, proved on data whose exact denoiser is closed form.

(a) A Gaussian N(mu, diag(var)) in 4 dims: D(x, sigma) = mu + var / (var + sigma^2) (x - mu), and the
    probability-flow ODE from sigma_a to sigma_b is x(sigma_b) = mu + sqrt((var + sigma_b^2) /
    (var + sigma_a^2)) (x(sigma_a) - mu). Every sampler is then affine in its Gaussian inputs (initial
    noise and per-step noise), so its output law is exactly Gaussian and we compute it exactly with a
    probing RNG (`sampler_law`); a few thousand ImageRNG samples then check the sampled moments.
(b) A 1-D mixture of two Gaussians, whose posterior mean is closed form: the mode weights and means.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.objectives.base import Denoiser, Path, karras_sigmas, loglinear_sigmas
from ditkit.samplers import SAMPLERS, autoguided, count_calls, get_sampler, guided
from ditkit.samplers.continuous import sample_ddim, sample_ddpm, sample_dpmpp_1
from ditkit.samplers.sde import sample_adaptive, sample_euler_maruyama
from ditkit.utils import ImageRNG, image_seeds

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
MU = torch.tensor([0.2, -0.3, 0.1, 0.25], dtype=F64)  # small |mu|/sd: the sigma_max prior bias is < 0.004 sd
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=F64)

# The linear interpolant (rectified flow / SiT): x_t = (1 - t) x0 + t eps, sigma = t / (1 - t).
LINEAR = Path("linear", alpha=lambda t: 1 - t, s=lambda t: t, d_alpha=lambda t: -torch.ones_like(t),
              d_s=lambda t: torch.ones_like(t), t_of_sigma=lambda sg: sg / (1 + sg), t_min=0.0, t_max=1.0)

DETERMINISTIC = ["ddim", "dpm++1", "dpm++2m", "dpm++2s", "euler", "heun"]
# (name, options) for every sampler and its stochastic variants; the adaptive solver is not affine.
AFFINE_CASES = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}), ("dpm++1", {}),
                ("dpm++2m", {}), ("dpm++2m-sde", {}), ("dpm++2s", {}), ("euler", {}), ("heun", {}),
                ("heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}), ("heun", {"s_churn": 40.0}),
                ("euler-maruyama", {}), ("euler-maruyama", {"diffusion": "sigma"}),
                ("euler-maruyama", {"diffusion": "linear"}), ("euler-maruyama", {"diffusion": "constant"}),
                ("euler-maruyama", {"diffusion": "sigma", "diffusion_scale": 0.5})]


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


def gaussian_denoiser(mu: torch.Tensor = MU, var: torch.Tensor = VAR, path: Path | None = LINEAR) -> Denoiser:
    def fn(x, sigma, cond):  # x (B, 4, 1, 1), sigma (B,)
        m, v = _col(mu, x), _col(var, x)
        s2 = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) ** 2
        return m + v / (v + s2) * (x - m)
    return Denoiser(fn, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, path=path)


def exact_ode(x_start: torch.Tensor, sigma_a: float, sigma_b: float, mu=MU, var=VAR) -> torch.Tensor:
    m, v = _col(mu, x_start), _col(var, x_start)
    return m + torch.sqrt((v + sigma_b ** 2) / (v + sigma_a ** 2)) * (x_start - m)


def exact_sample(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact PF-ODE from sigmas[0] to sigmas[-2] then D there (every sampler's last step is x0_hat)."""
    s_lo = float(sigmas[-2])
    x_lo = exact_ode(noise * float(sigmas[0]), float(sigmas[0]), s_lo)
    return gaussian_denoiser()(x_lo, s_lo, Condition.none(noise.shape[0]))


def uniform_t_sigmas(n: int) -> torch.Tensor:
    """n levels uniform in t on the linear path (SiT's grid), from sigma_max to sigma_min, then 0."""
    t = torch.linspace(SIGMA_MAX / (1 + SIGMA_MAX), SIGMA_MIN / (1 + SIGMA_MIN), n, dtype=F64)
    return torch.cat([t / (1 - t), torch.zeros(1, dtype=F64)])


class ProbeRNG:
    """Stands in for ImageRNG on affine samplers: per-step draw k is a unit vector on row k + 2 only.

    With row 0 given zero initial noise and row 1 unit initial noise, a sampler that is affine in its
    Gaussian inputs, out = c + a * noise + sum_k b_k z_k (per dimension), reveals c (row 0), a and every
    b_k, hence its exact output law N(c, a^2 + sum_k b_k^2).
    """

    def __init__(self, batch: int):
        self.batch, self.draws = batch, 0

    def __len__(self) -> int:
        return self.batch

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        z[self.draws + 2] = 1
        self.draws += 1
        return z


def sampler_law(fn, denoiser: Denoiser, sigmas: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    steps = len(sigmas) - 1
    B = steps + 3
    noise = torch.zeros(B, 4, 1, 1, dtype=F64)
    noise[1] = 1
    out = fn(denoiser, noise, sigmas, cond=Condition.none(B), rng=ProbeRNG(B), **options).view(B, 4)
    c = out[0]
    return c, ((out[1:] - c) ** 2).sum(0)


def law_error(mean: torch.Tensor, var: torch.Tensor) -> float:
    """max over dims of |mean - mu| / sd and |var / VAR - 1|."""
    return max(((mean - MU) / VAR.sqrt()).abs().max().item(), (var / VAR - 1).abs().max().item())


def slope(steps, errs) -> float:
    """Convergence order: minus the least-squares slope of log(err) against log(steps)."""
    return -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])


def draw(seeds, shape=(4, 1, 1), dtype=F64) -> tuple[torch.Tensor, ImageRNG]:
    rng = ImageRNG(seeds)
    return rng.randn(shape, dtype=dtype), rng


# ---------------------------------------------------------------------------------------------
# Registry, NFE, callback.
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++1", "dpm++2m", "dpm++2m-sde", "dpm++2s", "euler", "heun",
                             "euler-maruyama", "adaptive", "maskgit"}
    assert {n for n, s in SAMPLERS.items() if s.kind == "discrete"} == {"maskgit"}  # over token logits
    with pytest.raises(UsageError, match="allowed: ddpm, ddim"):
        get_sampler("dpm-3m")
    assert get_sampler("heun").nfe(10) == 19 and get_sampler("dpm++2s").nfe(10) == 19
    assert get_sampler("adaptive").nfe(10) is None
    assert get_sampler("euler-maruyama").needs_path and not get_sampler("ddim").needs_path
    assert get_sampler("ddpm").stochastic and not get_sampler("dpm++2m").stochastic
    assert get_sampler("dpm++2m-sde").stochastic and get_sampler("dpm++2m-sde").nfe(10) == 10


CONTINUOUS = [n for n, s in SAMPLERS.items() if s.kind == "continuous"]  # the denoiser contract's samplers


@pytest.mark.parametrize("name", CONTINUOUS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_measured_nfe_and_callback(name, steps):
    spec = get_sampler(name)
    den = count_calls(gaussian_denoiser())
    noise, rng = draw(image_seeds(0, 3))
    events = []
    nfe_out = {} if name == "adaptive" else None
    kwargs = {"nfe_out": nfe_out} if name == "adaptive" else {}
    out = spec.fn(den, noise, karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX), cond=Condition.none(3), rng=rng,
                  callback=events.append, **kwargs)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert den.images == 3 * den.calls
    if name == "adaptive":
        assert nfe_out["nfe"] == den.calls == len(events) == events[-1]["nfe"]
    else:
        assert den.calls == spec.nfe(steps)
        assert [e["i"] for e in events] == list(range(steps))  # once per step
    for e in events:
        assert {"x", "i", "sigma", "denoised"} <= set(e) and e["x"].shape == noise.shape


# ---------------------------------------------------------------------------------------------
# Exact identities.
# ---------------------------------------------------------------------------------------------


def test_dpmpp1_equals_ddim_eta0():
    noise, _ = draw(image_seeds(1, 8))
    sig = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    a = sample_dpmpp_1(gaussian_denoiser(), noise, sig, cond=Condition.none(8))
    b = sample_ddim(gaussian_denoiser(), noise, sig, cond=Condition.none(8), eta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    c = get_sampler("euler").fn(gaussian_denoiser(), noise, sig, cond=Condition.none(8))
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


def test_ddpm_step_is_the_ddpm_posterior():
    """One ddpm step from sigma t to s equals Ho et al. (2020) eq. 7 written in VP coordinates."""
    t, s = 3.0, 0.7
    x0 = torch.tensor([0.4, -1.2, 2.0, 0.1], dtype=F64).view(1, 4, 1, 1).expand(2, 4, 1, 1)
    den = Denoiser(lambda x, sigma, cond: x0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    seeds = image_seeds(5, 2)
    noise, rng = draw(seeds)
    seen = []
    sample_ddpm(den, noise, torch.tensor([t, s, 0.0], dtype=F64), cond=Condition.none(2), rng=rng,
                callback=seen.append)
    x_s = seen[1]["x"]  # state at sigma = s, in sigma-space
    replay = ImageRNG(seeds)
    replay.randn_like(noise)  # the initial noise
    z = replay.randn_like(noise)  # the per-step draw, replayed from the same seeds
    ab_t, ab_s = 1 / (1 + t * t), 1 / (1 + s * s)  # alpha_bar of the VP view: sigma^2 = (1 - ab) / ab
    beta = 1 - ab_t / ab_s  # the jump's beta (any subset of the training steps)
    x_t_vp = math.sqrt(ab_t) * noise * t
    mean = math.sqrt(ab_s) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * x_t_vp
    var = (1 - ab_s) / (1 - ab_t) * beta  # beta_tilde
    torch.testing.assert_close(math.sqrt(ab_s) * x_s, mean + math.sqrt(var) * z, rtol=0, atol=1e-12)


def test_ddpm_equals_ddim_eta1():
    seeds = image_seeds(2, 5)
    sig = loglinear_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    n1, r1 = draw(seeds)
    n2, r2 = draw(seeds)
    a = sample_ddpm(gaussian_denoiser(), n1, sig, cond=Condition.none(5), rng=r1)
    b = sample_ddim(gaussian_denoiser(), n2, sig, cond=Condition.none(5), rng=r2, eta=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_dpmpp_2m_sde_without_history_is_ddpm():
    """SDE-DPM-Solver++'s first-order step, e^{-h} = s/t, is the DDPM posterior step: on a 2-step grid
    (one stochastic step, then x0_hat) the two samplers agree, with the same per-image draws."""
    seeds = image_seeds(4, 5)
    sig = torch.tensor([7.0, 0.8, 0.0], dtype=F64)
    n1, r1 = draw(seeds)
    n2, r2 = draw(seeds)
    a = sample_ddpm(gaussian_denoiser(), n1, sig, cond=Condition.none(5), rng=r1)
    b = get_sampler("dpm++2m-sde").fn(gaussian_denoiser(), n2, sig, cond=Condition.none(5), rng=r2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dpmpp_2m_sde_weak_order_is_two_and_ddpm_one():
    """The exact output law's error on the Gaussian: SDE-DPM-Solver++(2M) falls as steps^-2 (its
    multistep correction), DDPM as steps^-1; at 256 steps the SDE solver is ~10x closer."""
    steps = [64, 128, 256]
    sde = [law_error(*sampler_law(get_sampler("dpm++2m-sde").fn, gaussian_denoiser(), uniform_t_sigmas(n)))
           for n in steps]
    ddpm = [law_error(*sampler_law(get_sampler("ddpm").fn, gaussian_denoiser(), uniform_t_sigmas(n))) for n in steps]
    assert 1.8 <= slope(steps, sde) <= 2.4, sde
    assert 0.8 <= slope(steps, ddpm) <= 1.2, ddpm
    assert sde[-1] < ddpm[-1] / 5


# ---------------------------------------------------------------------------------------------
# Convergence on the Gaussian.
# ---------------------------------------------------------------------------------------------

ORDERS = {"ddim": (0.8, 1.3), "euler": (0.8, 1.3), "dpm++1": (0.8, 1.3),
          "heun": (1.7, 2.6), "dpm++2m": (1.7, 2.6), "dpm++2s": (1.7, 2.6)}


@pytest.mark.parametrize("grid", ["karras", "loglinear"])
@pytest.mark.parametrize("name", list(ORDERS))
def test_deterministic_convergence_order(name, grid):
    mu = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64)
    noise, _ = draw(image_seeds(3, 32))
    steps = [16, 32, 64, 128]  # 8 steps is still pre-asymptotic for dpm++2m on the log-linear grid
    make = karras_sigmas if grid == "karras" else loglinear_sigmas
    errs = []
    for n in steps:
        sig = make(n, SIGMA_MIN, SIGMA_MAX)
        out = get_sampler(name).fn(gaussian_denoiser(mu), noise, sig, cond=Condition.none(32))
        s_lo = float(sig[-2])
        ref = gaussian_denoiser(mu)(exact_ode(noise * SIGMA_MAX, SIGMA_MAX, s_lo, mu=mu), s_lo, None)
        errs.append((out - ref).abs().max().item())
    lo, hi = ORDERS[name]
    assert errs[-1] > 1e-9  # not at float64 noise
    assert lo <= slope(steps, errs) <= hi, (name, grid, errs)


@pytest.mark.parametrize("name,options", AFFINE_CASES, ids=lambda v: str(v))
def test_exact_output_law_converges(name, options):
    """The sampler's exact output law (affine in Gaussian inputs) approaches N(MU, VAR) as steps grow."""
    fn = get_sampler(name).fn
    steps = [16, 64, 256]
    errs = [law_error(*sampler_law(fn, gaussian_denoiser(), uniform_t_sigmas(n), **options)) for n in steps]
    assert errs[0] > errs[1] and errs[2] <= errs[1] + 1e-4, errs
    assert errs[-1] < 0.03, errs  # floor: the N(0, sigma_max^2) prior is 0.004 sd off the true marginal


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 0.5}),
                                          ("euler-maruyama", {"diffusion": "sigma"}),
                                          ("euler-maruyama", {"diffusion": "constant"})], ids=str)
def test_stochastic_weak_order_is_one(name, options):
    fn = get_sampler(name).fn
    steps = [16, 32, 64]
    errs = [law_error(*sampler_law(fn, gaussian_denoiser(), uniform_t_sigmas(n), **options)) for n in steps]
    assert 0.8 <= slope(steps, errs) <= 1.3, errs


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("heun", {"s_churn": 10.0}),
                                          ("euler-maruyama", {}), ("euler-maruyama", {"diffusion": "constant"}),
                                          ("dpm++2m", {}), ("dpm++2m-sde", {})], ids=str)
def test_sampled_moments_match_the_law(name, options):
    """A few thousand ImageRNG samples: moments agree with the exact law and are near N(MU, VAR)."""
    fn = get_sampler(name).fn
    sig = uniform_t_sigmas(64)
    mean, var = sampler_law(fn, gaussian_denoiser(), sig, **options)
    assert law_error(mean, var) < 0.12  # ddpm, first order with a large constant, is the slowest
    B = 2000
    noise, rng = draw(image_seeds(11, B))
    x = fn(gaussian_denoiser(), noise, sig, cond=Condition.none(B), rng=rng, **options).view(B, 4)
    z = (x - mean) / var.sqrt()  # standardised by the exact law: 8000 values ~ N(0, 1)
    assert abs(z.mean().item()) < 0.05  # 4.5 sd of the mean of 8000
    assert abs(z.var().item() - 1) < 0.07  # 4.4 sd of the variance of 8000
    assert ((x.mean(0) - MU) / VAR.sqrt()).abs().max() < 0.12


# ---------------------------------------------------------------------------------------------
# Mixture of Gaussians.
# ---------------------------------------------------------------------------------------------

MIX_W, MIX_M, MIX_V = (0.3, 0.7), (-2.0, 2.0), 0.25


def mixture_denoiser() -> Denoiser:
    w = torch.tensor(MIX_W, dtype=F64)
    m = torch.tensor(MIX_M, dtype=F64)

    def fn(x, sigma, cond):  # x (B, 1, 1, 1): posterior mean E[x0 | x] of the 2-mode mixture
        xv = x.reshape(-1, 1).to(F64)
        v = MIX_V + sigma.to(F64).view(-1, 1) ** 2
        logr = torch.log(w) - (xv - m) ** 2 / (2 * v)  # (B, 2); same variance in both modes
        r = torch.softmax(logr, dim=1)
        x0 = (r * (m + MIX_V / v * (xv - m))).sum(1)
        return x0.view_as(x).to(x.dtype)
    return Denoiser(fn, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, path=LINEAR)


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {}), ("dpm++2m", {}), ("dpm++2s", {}),
                                          ("euler", {}), ("heun", {}), ("heun", {"s_churn": 10.0}),
                                          ("euler-maruyama", {}), ("adaptive", {}), ("dpm++2m-sde", {})], ids=str)
def test_mixture_mode_weights_and_means(name, options):
    B = 2000
    noise, rng = draw(image_seeds(21, B), shape=(1, 1, 1))
    steps = 64 if name in ("ddpm", "ddim", "euler") else 32
    x = get_sampler(name).fn(mixture_denoiser(), noise, uniform_t_sigmas(steps), cond=Condition.none(B),
                             rng=rng, **options).view(B)
    pos, neg = x[x > 0], x[x <= 0]
    assert abs(len(pos) / B - MIX_W[1]) < 0.05  # binomial sd 0.01
    assert abs(pos.mean().item() - MIX_M[1]) < 0.1 and abs(neg.mean().item() - MIX_M[0]) < 0.15
    assert abs(pos.std().item() - MIX_V ** 0.5) < 0.1 and abs(neg.std().item() - MIX_V ** 0.5) < 0.1


# ---------------------------------------------------------------------------------------------
# Per-image randomness: the same seed gives the same image whatever the batch.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpm++2m", {}), ("dpm++2s", {}),
                                          ("euler", {}), ("heun", {"s_churn": 20.0}), ("dpm++1", {}),
                                          ("euler-maruyama", {"diffusion": "linear"}), ("dpm++2m-sde", {})], ids=str)
def test_same_seed_same_image_whatever_the_batch(name, options):
    seeds = image_seeds(7, 6)
    fn = get_sampler(name).fn
    sig = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)

    def run(sub):
        noise, rng = draw(sub, dtype=torch.float32)
        return fn(gaussian_denoiser(), noise, sig, cond=Condition.none(len(sub)), rng=rng, **options)
    full = run(seeds)
    parts = torch.cat([run(seeds[:1]), run(seeds[1:])])
    assert full.dtype == torch.float32
    assert torch.equal(full, parts)


def test_adaptive_batches_agree_to_tolerance():
    seeds = image_seeds(8, 6)
    sig = karras_sigmas(4, SIGMA_MIN, SIGMA_MAX)

    def run(sub):
        noise, _ = draw(sub)
        return sample_adaptive(gaussian_denoiser(), noise, sig, cond=Condition.none(len(sub)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(seeds), torch.cat([run(seeds[:1]), run(seeds[1:])]), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Time-domain samplers: SiT's SDE, the tutorial's invalid SDE, the adaptive ODE.
# ---------------------------------------------------------------------------------------------


def tutorial_sde(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, cond, rng) -> torch.Tensor:
    """The INVALID SDE of a popular tutorial: dX = v(X, t) dt + gamma'(t) dW, where the drift v contains
    gamma'(t) z (z the predicted noise) but no score correction -1/2 w score. Test-only, to show why
    the correction matters. Here gamma = s(t) = t, so gamma' = 1."""
    p = denoiser.path
    ts = p.t_of_sigma(sigmas[:-1]).tolist()
    x = ts[0] * noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.tensor(t, dtype=F64)
        a, s, da, ds = (float(f(tt)) for f in (p.alpha, p.s, p.d_alpha, p.d_s))
        x0 = denoiser(x / a, s / a, cond)
        z = (x / a - x0) / (s / a)
        dt = t_next - t
        x = x + (da * x0 + ds * z) * dt + ds * math.sqrt(-dt) * rng.randn_like(x)
    t = ts[-1]
    return denoiser(x / (1 - t), t / (1 - t), cond)


def test_tutorial_sde_has_the_wrong_variance_ours_the_right_one():
    sig = uniform_t_sigmas(128)
    ours = law_error(*sampler_law(sample_euler_maruyama, gaussian_denoiser(), sig, diffusion="constant"))
    wrong_mean, wrong_var = sampler_law(tutorial_sde, gaussian_denoiser(), sig)
    assert ours < 0.02
    assert (wrong_var / VAR - 1).min() > 0.3  # noise added without the score term inflates the variance
    # and with samples: 2000 images, constant diffusion (w = gamma'^2 = 1) in both
    B = 2000
    noise, rng = draw(image_seeds(31, B))
    x_ours = sample_euler_maruyama(gaussian_denoiser(), noise, uniform_t_sigmas(64), cond=Condition.none(B),
                                   rng=rng, diffusion="constant").view(B, 4)
    noise, rng = draw(image_seeds(31, B))
    x_wrong = tutorial_sde(gaussian_denoiser(), noise, uniform_t_sigmas(64), cond=Condition.none(B),
                           rng=rng).view(B, 4)
    assert ((x_ours.var(0) / VAR) - 1).abs().max() < 0.15
    assert ((x_wrong.var(0) / VAR) - 1).min() > 0.3


@pytest.mark.parametrize("diffusion", ["sbdm", "sigma", "linear", "constant"])
def test_euler_maruyama_linear_path_moments(diffusion):
    B = 2000
    noise, rng = draw(image_seeds(41, B))
    x = sample_euler_maruyama(gaussian_denoiser(), noise, uniform_t_sigmas(64), cond=Condition.none(B), rng=rng,
                              diffusion=diffusion).view(B, 4)
    assert ((x.mean(0) - MU) / VAR.sqrt()).abs().max() < 0.1
    assert ((x.var(0) / VAR) - 1).abs().max() < 0.15


def test_adaptive_reaches_the_exact_solution_and_reports_nfe():
    noise, _ = draw(image_seeds(51, 16))
    sig = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    ref = exact_sample(noise, sig)
    errs, nfes = [], []
    for tol in (1e-4, 1e-7):
        info, events = {}, []
        den = count_calls(gaussian_denoiser())
        out = sample_adaptive(den, noise, sig, cond=Condition.none(16), rtol=tol, atol=tol, nfe_out=info,
                              callback=events.append)
        errs.append((out - ref).abs().max().item())
        nfes.append(info["nfe"])
        assert info["nfe"] == den.calls == events[-1]["nfe"] == len(events)
    assert errs[0] < 1e-2 and errs[1] < 1e-5 and errs[1] < errs[0]
    assert nfes[1] > nfes[0]
    dop = sample_adaptive(gaussian_denoiser(), noise, sig, cond=Condition.none(16), method="DOP853",
                          rtol=1e-7, atol=1e-7)
    assert (dop - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 3
CLASS_MEANS = torch.tensor([[-2.0, 0.0, 1.0, 0.5], [1.0, 1.0, -1.0, 0.0], [0.0, -2.0, 0.5, 2.0],
                            [0.0, 0.0, 0.0, 0.0]], dtype=F64)  # last row: the null class (overall mean)


def class_denoiser(calls: list | None = None) -> Denoiser:
    def fn(x, sigma, cond):  # x (B, 4, 1, 1); class-dependent Gaussian posterior mean
        if calls is not None:
            calls.append(x.shape[0])
        m = CLASS_MEANS[cond.labels].to(x.dtype).view(-1, 4, 1, 1)
        v = 0.5
        s2 = sigma.to(x.dtype).view(-1, 1, 1, 1) ** 2
        return m + v / (v + s2) * (x - m)
    return Denoiser(fn, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


def test_guidance_scale_one_is_the_conditional_model():
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    calls = []
    out = guided(class_denoiser(calls), 1.0)(x, 2.0, cond)
    assert torch.equal(out, class_denoiser()(x, 2.0, cond)) and calls == [4]  # no unconditional half
    noise, _ = draw(image_seeds(61, 4))
    sig = karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    a = get_sampler("dpm++2m").fn(guided(class_denoiser(), 1.0), noise, sig, cond=cond)
    b = get_sampler("dpm++2m").fn(class_denoiser(), noise, sig, cond=cond)
    assert torch.equal(a, b)


def test_guidance_formula_one_forward_per_image_scales_and_interval():
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    d_c = class_denoiser()(x, 2.0, cond)
    d_u = class_denoiser()(x, 2.0, cond.null())
    calls = []
    out = guided(class_denoiser(calls), 3.0)(x, 2.0, cond)
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u))
    assert calls == [8]  # one batched forward on [cond; null]
    calls.clear()
    scales = torch.tensor([1.0, 3.0, 0.0, 2.0])
    out = guided(class_denoiser(calls), scales)(x, 2.0, cond)
    assert calls == [7]  # the scale-1 image skips its unconditional half
    assert torch.equal(out[0], d_c[0])
    torch.testing.assert_close(out[1:], (d_u + scales.to(F64).view(-1, 1, 1, 1) * (d_c - d_u))[1:])
    torch.testing.assert_close(out[2], d_u[2])
    calls.clear()
    g = guided(class_denoiser(calls), 3.0, interval=(0.5, 10.0))
    assert torch.equal(g(x, 20.0, cond), class_denoiser()(x, 20.0, cond)) and calls == [4]  # outside
    torch.testing.assert_close(g(x, 2.0, cond), d_u + 3.0 * (d_c - d_u))  # inside


def test_guidance_one_scale_equals_per_image_scales_bit_for_bit():
    """The one-scale fast path (ditkit sample) and the per-image path (a server batch) give the same bits."""
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    noise, _ = draw(image_seeds(62, 4))
    sig = karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    for dtype in (F64, torch.float32):
        n = noise.to(dtype)
        a = get_sampler("dpm++2m").fn(guided(class_denoiser(), 2.5), n, sig, cond=cond)
        b = get_sampler("dpm++2m").fn(guided(class_denoiser(), torch.full((4,), 2.5)), n, sig, cond=cond)
        assert a.dtype == dtype and torch.equal(a, b)
    # a new condition object is not confused with the one the wrapper saw before
    g = guided(class_denoiser(), 2.0)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    other = Condition.from_labels(torch.tensor([2, 2, 0, 0]), NUM_CLASSES)
    g(x, 2.0, cond)
    assert torch.equal(g(x, 2.0, other), guided(class_denoiser(), 2.0)(x, 2.0, other))


@pytest.mark.parametrize("scale", [float("nan"), -0.5, torch.tensor([1.0, float("nan")]), torch.tensor([2.0, -1.0]),
                                   "big", torch.ones(2, 2)])
def test_guidance_rejects_bad_scales(scale):
    with pytest.raises(UsageError, match="scale"):
        guided(class_denoiser(), scale)


def test_guidance_rejects_bad_interval_and_batch_mismatch():
    for interval in [(2.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (1.0,)]:
        with pytest.raises(UsageError, match="interval"):
            guided(class_denoiser(), 2.0, interval=interval)
    g = guided(class_denoiser(), torch.tensor([2.0, 3.0, 4.0]))
    cond = Condition.from_labels(torch.tensor([0, 1]), NUM_CLASSES)
    with pytest.raises(UsageError, match="3 entries for a batch of 2"):
        g(torch.zeros(2, 4, 1, 1, dtype=F64), 1.0, cond)


def test_guidance_ramp_schedule_is_its_formula_at_each_images_sigma():
    """ramp: w(sigma) = 1 + 2 (w - 1) / (1 + sigma) at each image's own sigma; no guidance at pure noise, 2w - 1 at
    the data, and on the linear path (1 / (1 + sigma) = 1 - t) a mean of w over uniform t."""
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.0, 0.5, 3.0, 1e9], dtype=F64)
    d_c = class_denoiser()(x, sigma, cond)
    d_u = class_denoiser()(x, sigma, cond.null())
    for scale in (2.5, torch.tensor([2.5, 2.5, 2.5, 2.5])):
        out = guided(class_denoiser(), scale, schedule="ramp")(x, sigma, cond)
        w = (1 + 2 * 1.5 / (1 + sigma)).view(-1, 1, 1, 1)
        torch.testing.assert_close(out, d_u + w * (d_c - d_u))
    torch.testing.assert_close(out[0], (d_u + 4.0 * (d_c - d_u))[0])  # sigma 0: 2w - 1
    torch.testing.assert_close(out[3], d_c[3], atol=1e-8, rtol=0)  # pure noise: the conditional model
    t = torch.linspace(0, 1, 100001, dtype=F64)[:-1]
    assert abs(float((1 + 2 * 1.5 * (1 - t)).mean()) - 2.5) < 1e-4  # sigma = t / (1 - t) on the linear path
    # scale 1 stays the conditional model bit for bit, with one forward
    calls = []
    assert torch.equal(guided(class_denoiser(calls), 1.0, schedule="ramp")(x, sigma, cond), d_c) and calls == [4]
    # a sampler run: the ramp differs from the constant scale, and both are deterministic
    noise, _ = draw(image_seeds(63, 4))
    sig = karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    run = lambda sch: get_sampler("dpm++2m").fn(guided(class_denoiser(), 2.0, schedule=sch), noise, sig, cond=cond)  # noqa: E731
    assert torch.equal(run("ramp"), run("ramp")) and not torch.allclose(run("ramp"), run("constant"))
    with pytest.raises(UsageError, match="allowed constant, ramp"):
        guided(class_denoiser(), 2.0, schedule="linear")


# ---------------------------------------------------------------------------------------------
# Autoguidance (Karras et al. 2024): D_w = D_weak + w (D - D_weak).
# ---------------------------------------------------------------------------------------------


def test_autoguidance_cancels_an_error_the_weak_model_makes_twice_over():
    """The principle of autoguidance, exactly: the good model over-estimates the data variance by d, the
    weak model (trained less) by 2d, in the same direction. Extrapolating at w = 2 cancels the error to
    first order (2 D(v + d) - D(v + 2d) = D(v) + O(d^2)), so the sampled law is much closer to the data's
    than the good model's own. Laws are exact (affine sampler, Gaussian inputs)."""
    sig = karras_sigmas(60, SIGMA_MIN, SIGMA_MAX)
    fn = get_sampler("dpm++2m").fn
    d = 0.15 * VAR
    good, weak = gaussian_denoiser(var=VAR + d), gaussian_denoiser(var=VAR + 2 * d)
    err_good = (sampler_law(fn, good, sig)[1] / VAR - 1).abs().max().item()
    err_auto = (sampler_law(fn, autoguided(good, weak, 2.0), sig)[1] / VAR - 1).abs().max().item()
    assert err_good > 0.14  # the good model's own error: ~15% too much variance
    assert err_auto < 0.035, err_auto  # second order in d (exactly 0.026 here)
    # and over-guiding overshoots: the law becomes too narrow
    var3 = sampler_law(fn, autoguided(good, weak, 3.0), sig)[1]
    assert bool((var3 < VAR).all())


def test_autoguidance_identities_and_per_image_scales():
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    calls_good, calls_weak = [], []
    good, weak = class_denoiser(calls_good), gaussian_denoiser(path=None)
    # w = 1: the model itself, bit for bit, and the weak model is not run
    assert torch.equal(autoguided(good, weak, 1.0)(x, 2.0, cond), good(x, 2.0, cond))
    assert torch.equal(autoguided(good, weak, torch.ones(4))(x, 2.0, cond), good(x, 2.0, cond))
    # the same model as its own weak model: no change whatever w
    assert torch.equal(autoguided(good, good, 3.0)(x, 2.0, cond), good(x, 2.0, cond))
    # the formula, and per-image scales: an image at w = 1 gets D's bits among others at w != 1
    w = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=F64)
    out = autoguided(good, weak, w)(x, 2.0, cond)
    d_g, d_w = good(x, 2.0, cond), weak(x, 2.0, cond)
    torch.testing.assert_close(out, d_w + w.view(-1, 1, 1, 1) * (d_g - d_w), rtol=0, atol=1e-12)
    assert torch.equal(out[1], d_g[1])
    # it composes with classifier-free guidance (the good side may itself be guided)
    cfg = guided(good, 2.0)
    torch.testing.assert_close(autoguided(cfg, weak, 2.0)(x, 2.0, cond), 2 * cfg(x, 2.0, cond) - weak(x, 2.0, cond),
                               rtol=0, atol=1e-12)


def test_autoguidance_interval_guides_only_inside_and_runs_the_weak_model_only_there():
    """Autoguidance limited to sigma in [lo, hi] (as guided()'s interval, Kynkaanniemi et al. 2024): outside
    the band an image gets the model's own bits and the weak model does not see it; inside, the formula."""
    labels = torch.tensor([0, 1, 2, 1])
    cond = Condition.from_labels(labels, NUM_CLASSES)
    x = torch.randn(4, 4, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    weak_rows: list = []
    good = class_denoiser()

    def weak_fn(x, sigma, cond):
        weak_rows.append(x.shape[0])
        return 0.8 * good(x, sigma, cond) + 0.1
    weak = good.wrap(weak_fn)
    sigma = torch.tensor([0.1, 2.0, 5.0, 2.0], dtype=F64)  # a server's batch: images at different levels
    band = (1.0, 4.0)
    w = torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=F64)
    for scale in (2.0, w):
        weak_rows.clear()
        out = autoguided(good, weak, scale, interval=band)(x, sigma, cond)
        assert weak_rows == [2]  # the weak model saw the two images inside the band only
        full = autoguided(good, weak, scale)(x, sigma, cond)
        d_g = good(x, sigma, cond)
        assert torch.equal(out[[0, 2]], d_g[[0, 2]])  # outside the band: the model's own prediction
        torch.testing.assert_close(out[1], full[1], rtol=0, atol=1e-12)  # inside: autoguided
        if isinstance(scale, torch.Tensor):
            assert torch.equal(out[3], d_g[3])  # inside, but at w = 1
        else:
            torch.testing.assert_close(out[3], full[3], rtol=0, atol=1e-12)
    # every image outside: the model alone, bit for bit, no weak call; every image inside: the plain formula
    weak_rows.clear()
    assert torch.equal(autoguided(good, weak, 2.0, interval=(3.0, 4.0))(x, 2.0, cond), good(x, 2.0, cond))
    assert weak_rows == []
    assert torch.equal(autoguided(good, weak, 2.0, interval=(0.0, float("inf")))(x, sigma, cond),
                       autoguided(good, weak, 2.0)(x, sigma, cond))
    for bad in [(2.0, 1.0), (-1.0, 2.0), (float("nan"), 1.0), (1.0,), "0.3"]:
        with pytest.raises(UsageError, match="interval"):
            autoguided(good, weak, 2.0, interval=bad)


def test_autoguidance_rejects_bad_scales_and_mismatched_models():
    for scale in [float("nan"), -1.0, torch.tensor([2.0, float("inf")])]:
        with pytest.raises(UsageError, match="scale"):
            autoguided(class_denoiser(), class_denoiser(), scale)
    g = autoguided(class_denoiser(), class_denoiser(), torch.tensor([2.0, 3.0, 4.0]))
    with pytest.raises(UsageError, match="3 entries for a batch of 2"):
        g(torch.zeros(2, 4, 1, 1, dtype=F64), 1.0, Condition.from_labels(torch.tensor([0, 1]), NUM_CLASSES))
    with pytest.raises(UsageError, match="same kind of objective"):
        autoguided(gaussian_denoiser(path=LINEAR), gaussian_denoiser(path=None), 2.0)


# ---------------------------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------------------------


def _run(name, den=None, sigmas=None, rng="default", **options):
    noise, r = draw(image_seeds(9, 2))
    den = den or gaussian_denoiser()
    sigmas = karras_sigmas(4, SIGMA_MIN, SIGMA_MAX) if sigmas is None else sigmas
    return get_sampler(name).fn(den, noise, sigmas, cond=Condition.none(2), rng=r if rng == "default" else rng,
                                **options)


@pytest.mark.parametrize("name,options,match", [
    ("euler", {"eta": 0.5}, "unknown option.*eta.*allowed options: none"),
    ("ddim", {"eta": 1.5}, "eta"), ("ddim", {"eta": float("nan")}, "eta"), ("ddim", {"eta": "x"}, "eta"),
    ("heun", {"s_churn": -1.0}, "s_churn"), ("heun", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax"),
    ("heun", {"s_noise": -1.0}, "s_noise"),
    ("euler-maruyama", {"diffusion": "brownian"}, "allowed: sbdm, sigma, linear, constant"),
    ("euler-maruyama", {"diffusion_scale": -1.0}, "diffusion_scale"),
    ("adaptive", {"rtol": 0.0}, "rtol"), ("adaptive", {"atol": -1e-3}, "atol"),
    ("adaptive", {"method": "Radau"}, "allowed: RK45"), ("adaptive", {"nfe_out": 3}, "nfe_out"),
])
def test_bad_options_raise_usage_error(name, options, match):
    with pytest.raises(UsageError, match=match):
        _run(name, **options)


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 0.3}), ("heun", {"s_churn": 1.0}),
                                          ("euler-maruyama", {}), ("dpm++2m-sde", {})], ids=str)
def test_stochastic_samplers_need_an_rng(name, options):
    with pytest.raises(UsageError, match="rng"):
        _run(name, rng=None, **options)
    _run("ddim", rng=None)  # deterministic: no rng needed


def test_bad_grids_and_missing_path():
    with pytest.raises(UsageError, match="end with 0"):
        _run("euler", sigmas=torch.tensor([80.0, 1.0, 0.5], dtype=F64))
    with pytest.raises(UsageError, match="decreasing"):
        _run("euler", sigmas=torch.tensor([1.0, 80.0, 0.0], dtype=F64))
    with pytest.raises(UsageError, match="length"):
        _run("euler", sigmas=torch.tensor([0.0], dtype=F64))
    for name in ("euler-maruyama", "adaptive"):
        with pytest.raises(UsageError, match="path"):
            _run(name, den=gaussian_denoiser(path=None))
    short = Path("short", LINEAR.alpha, LINEAR.s, LINEAR.d_alpha, LINEAR.d_s, LINEAR.t_of_sigma, t_min=0.0, t_max=0.9)
    with pytest.raises(UsageError, match="outside the path's range"):
        _run("euler-maruyama", den=gaussian_denoiser(path=short))
    with pytest.raises(UsageError, match="rng has 3 generators"):
        _run("ddpm", rng=ImageRNG(image_seeds(0, 3)))
    with pytest.raises(UsageError, match="cond has 3 entries"):
        noise, rng = draw(image_seeds(0, 2))
        get_sampler("euler").fn(class_denoiser(), noise, karras_sigmas(3, SIGMA_MIN, SIGMA_MAX),
                                cond=Condition.from_labels(torch.tensor([0, 1, 2]), NUM_CLASSES))


# -- the model's own class evidence (samplers.implicit) ------------------------------------------------------

def _class_gaussians(K: int = 4, dim: int = 6, var: float = 0.3, seed: int = 0):
    """K classes, class c ~ N(mu_c, var I) in `dim` dims (as (dim, 1, 1) images), and its exact conditional
    denoiser D(x, sigma, c) = mu_c + var / (var + sigma^2) (x - mu_c)."""
    g = torch.Generator().manual_seed(seed)
    mus = 2.0 * torch.randn(K, dim, 1, 1, generator=g, dtype=F64)

    def fn(x, sigma, cond):
        mu = mus[cond.labels]
        k = (var / (var + sigma.to(F64) ** 2)).view(-1, 1, 1, 1)
        return mu + k * (x - mu)

    return mus, var, Denoiser(fn, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


def test_class_errors_equal_the_closed_form_with_one_noise_shared_by_every_class():
    from ditkit.samplers.implicit import class_errors

    mus, var, D = _class_gaussians()
    K = mus.shape[0]
    g = torch.Generator().manual_seed(1)
    x0 = mus[torch.tensor([0, 3, 1])] + var ** 0.5 * torch.randn(3, *mus.shape[1:], generator=g, dtype=F64)
    seeds = image_seeds(5, 3)
    sigmas = (0.5, 2.0, 150.0)  # 150 lies above sigma_max = 80: left out
    E = class_errors(D, x0, K, ImageRNG(seeds), sigmas=sigmas)
    # closed form with the very same draws: D - x0 = (1 - k)(mu_c - x0) + k sigma eps
    rng, want = ImageRNG(seeds), torch.zeros(3, K, dtype=F64)
    for s in (0.5, 2.0):
        eps = rng.randn(x0.shape[1:]).to(F64)
        k = var / (var + s * s)
        for c in range(K):
            r = (1 - k) * (mus[c] - x0) + k * s * eps
            want[:, c] += r.pow(2).flatten(1).mean(1) / s ** 2
    assert torch.allclose(E, want, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="no noise level"):
        class_errors(D, x0, K, ImageRNG(seeds), sigmas=(100.0,))
    with pytest.raises(ValueError, match="3 images but 2 generators"):
        class_errors(D, x0, K, ImageRNG(seeds[:2]))


def test_implicit_classifier_reads_well_separated_classes_and_margin_signs():
    from ditkit.samplers.implicit import class_errors, relative_margin

    mus, var, D = _class_gaussians(K=5, dim=16, var=0.05)
    n = 200
    y = torch.arange(n) % 5
    g = torch.Generator().manual_seed(2)
    x0 = mus[y] + var ** 0.5 * torch.randn(n, *mus.shape[1:], generator=g, dtype=F64)
    E = class_errors(D, x0, 5, ImageRNG(image_seeds(0, n)))
    assert (E.argmin(1) == y).float().mean() > 0.97
    m = relative_margin(E, y)
    assert (m < 0).float().mean() > 0.97 and bool((m >= -1).all())
    # asked for the wrong class: the margin is positive
    assert (relative_margin(E, (y + 1) % 5) > 0).float().mean() > 0.97
    # a denoiser blind to the class gives every class the same error (common noise): margin exactly 0
    blind = Denoiser(lambda x, s, c: 0.5 * x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    Eb = class_errors(blind, x0[:4], 5, ImageRNG(image_seeds(0, 4)))
    assert torch.equal(relative_margin(Eb, y[:4]), torch.zeros(4, dtype=F64))
    # by hand: errors (2, 3, 4) asked 0 -> (2 - 3) / 3; asked 2 -> (4 - 2) / 2
    hand = torch.tensor([[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]], dtype=F64)
    assert torch.allclose(relative_margin(hand, torch.tensor([0, 2])), torch.tensor([-1 / 3, 1.0], dtype=F64))
