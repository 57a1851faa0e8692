"""Objectives: the DDPM schedule against its closed forms, one t per sample, the denoiser adapters."""

import math

import pytest
import torch

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.objectives import DDPMObjective, InterpolantObjective, build_objective
from ditkit.objectives.interpolant import make_path


def test_linear_schedule_closed_form():
    obj = DDPMObjective()
    b = obj.betas
    assert len(b) == 1000 and math.isclose(b[0], 1e-4) and math.isclose(b[-1], 0.02)
    t = torch.arange(1000, dtype=torch.float64)
    beta_t = 1e-4 + t * (0.02 - 1e-4) / 999
    torch.testing.assert_close(b, beta_t)
    # abar_t = prod (1 - beta_s), computed in log space independently
    torch.testing.assert_close(obj.alphas_cumprod, torch.exp(torch.cumsum(torch.log1p(-beta_t), 0)))
    assert 4.0e-5 < float(obj.alphas_cumprod[-1]) < 4.1e-5  # the well-known abar_T of the DDPM schedule


def test_cosine_schedule_closed_form():
    obj = DDPMObjective(schedule="cosine")
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert math.isclose(float(obj.alphas_cumprod[t]), f(t + 1) / f(0), rel_tol=1e-9)
    assert float(obj.betas.max()) <= 0.999


class Recorder(torch.nn.Module):
    """A fake network that records what it is called with and returns zeros."""

    def forward(self, x, t, cond):
        self.x, self.t, self.cond = x, t, cond
        return torch.zeros_like(x)


@pytest.mark.parametrize("objective", ["ddpm", "linear"])
def test_every_sample_gets_its_own_t(objective):
    obj = build_objective({"name": objective})
    net = Recorder()
    g = torch.Generator().manual_seed(0)
    obj.loss(net, torch.zeros(256, 1, 4, 4), Condition.from_labels(torch.zeros(256, dtype=torch.long), 10), generator=g)
    assert net.t.shape == (256,)
    assert len(torch.unique(net.t)) > 200  # one draw per sample, not one per batch
    dropped = (net.cond.labels == 10).float().mean()
    assert 0.05 < float(dropped) < 0.15  # 10% label dropout to the null class


def test_ddpm_eps_loss_is_exact_on_a_perfect_network():
    obj = DDPMObjective()
    x0 = torch.randn(8, 1, 4, 4)
    noise = obj.sample_noise(8, (1, 4, 4), torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        def forward(self, x, t, cond):
            return noise["eps"]

    assert float(obj.loss(Oracle(), x0, Condition.none(8), noise=noise)) == 0.0


def test_min_snr_weighting():
    obj = DDPMObjective(min_snr_gamma=5.0)
    x0 = torch.ones(4, 1, 2, 2)
    noise = obj.sample_noise(4, (1, 2, 2), torch.Generator().manual_seed(0))
    noise["t"] = torch.tensor([0, 100, 500, 999])
    plain = DDPMObjective()
    net = Recorder()
    abar = plain.alphas_cumprod[noise["t"]]
    snr = abar / (1 - abar)
    w = snr.clamp(max=5.0) / snr
    per = noise["eps"].pow(2).flatten(1).mean(1).double()  # zero output: MSE = |eps|^2
    assert math.isclose(float(obj.loss(net, x0, Condition.none(4), noise=noise)), float((per * w).mean()), rel_tol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_denoiser_recovers_x0_from_a_perfect_network(prediction):
    obj = DDPMObjective(prediction=prediction)
    x0, eps = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([5, 400, 990])
    abar = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = obj.sigmas[t]

    class Oracle(torch.nn.Module):
        def forward(self, x_t, tt, cond):
            torch.testing.assert_close(tt.double(), t.double())  # sigma -> t inversion is exact on the grid
            a, s = abar.sqrt(), (1 - abar).sqrt()
            torch.testing.assert_close(x_t, a * x0 + s * eps)
            return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]

    D = obj.denoiser(Oracle())
    torch.testing.assert_close(D(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, Condition.none(3)), x0)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "data"])
def test_interpolant_conversions_are_exact_inverses(path, prediction):
    obj = InterpolantObjective(path=path, prediction=prediction)
    x0, eps = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    p = obj.path
    col = lambda f: f(t).view(-1, 1, 1, 1)  # noqa: E731
    x_t = col(p.alpha) * x0 + col(p.s) * eps
    out = obj.output_from_x0(x0, x_t, t)
    torch.testing.assert_close(obj.x0_from_output(out, x_t, t), x0)
    if prediction == "velocity":
        torch.testing.assert_close(out, col(p.d_alpha) * x0 + col(p.d_s) * eps)
    # sigma <-> t round trip and the path's derivatives by finite differences
    torch.testing.assert_close(p.t_of_sigma(p.sigma_of_t(t)), t)
    h = 1e-6
    torch.testing.assert_close(p.d_alpha(t), (p.alpha(t + h) - p.alpha(t - h)) / (2 * h), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.d_s(t), (p.s(t + h) - p.s(t - h)) / (2 * h), atol=1e-6, rtol=1e-5)


def test_vp_path_agrees_with_ddpm_where_it_should():
    """The continuous VP path with beta(t) = 0.1 + 19.9 t is the T -> inf limit of DDPM's linear schedule
    (beta_i ~ beta(t_i)/T): log abar differs only by O(beta^2) and discretisation terms, and at equal
    sigma both objectives feed the network the same x_t and turn the same eps into the same x0."""
    ddpm, vp = DDPMObjective(), make_path("vp")
    i = torch.tensor([99, 499, 999])
    t = (i.double() + 1) / 1000
    log_abar = ddpm.alphas_cumprod[i].log()
    gap = (2 * vp.alpha(t).log() - log_abar).abs()
    assert bool((gap <= 0.015 * log_abar.abs()).all()), gap / log_abar.abs()  # within 1.5% in log-SNR terms

    x0, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    sigma = ddpm.sigmas[torch.tensor([99, 499, 900])]  # inside both objectives' sigma ranges
    seen = {}

    class EpsOracle(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x_t, tt, cond):
            seen[self.key] = x_t
            return eps

    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    a = ddpm.denoiser(EpsOracle("ddpm"))(x, sigma, Condition.none(3))
    b = InterpolantObjective(path="vp", prediction="noise").denoiser(EpsOracle("vp"))(x, sigma, Condition.none(3))
    torch.testing.assert_close(a, x0)
    torch.testing.assert_close(b, x0)
    torch.testing.assert_close(seen["ddpm"], seen["vp"])


def test_linear_interpolant_denoiser_on_exact_velocity():
    obj = InterpolantObjective(path="linear")
    x0, eps = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, tt, cond):
            return eps - x0  # v = d/dt ((1 - t) x0 + t eps)

    sigma = t / (1 - t)
    torch.testing.assert_close(obj.denoiser(Oracle())(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, Condition.none(2)), x0)


def test_sigma_grids():
    for name in ("ddpm", "linear", "gvp", "vp"):
        obj = build_objective({"name": name})
        for spacing in (("trailing", "leading", "uniform", "karras", "logsnr") if name == "ddpm"
                        else ("uniform", "karras", "logsnr")):
            g = obj.sigma_grid(10, spacing)
            assert g.shape == (11,) and g[-1] == 0 and bool((g[:-1] > 0).all())
            assert bool((g[1:] < g[:-1]).all()), (name, spacing)
    ddpm = DDPMObjective()
    torch.testing.assert_close(ddpm.sigma_grid(1000)[:-1], ddpm.sigmas.flip(0))
    assert math.isclose(float(ddpm.sigma_grid(10, "trailing")[0]), ddpm.sigma_max)


def test_bad_objective_settings():
    with pytest.raises(UsageError, match="allowed"):
        DDPMObjective(prediction="velocity")
    with pytest.raises(UsageError, match="allowed"):
        InterpolantObjective(prediction="eps")
    with pytest.raises(UsageError, match="allowed"):
        build_objective({"name": "edm"})
    with pytest.raises(UsageError, match="between 1 and"):
        DDPMObjective().sigma_grid(1001)
    with pytest.raises(UsageError, match="spacing"):
        InterpolantObjective().sigma_grid(10, "trailing")
    with pytest.raises(UsageError, match="must be a number >= 1"):
        InterpolantObjective(train_guidance=0.5)
    with pytest.raises(UsageError, match="label-dropout"):
        InterpolantObjective(train_guidance=2.0, label_dropout=0.0)


class _ClassTable(torch.nn.Module):
    """A network whose output is one learned image per label (the null label included), whatever x_t and t:
    least squares then learns, for each label, the mean of that label's targets."""

    def __init__(self, num_classes: int, shape: tuple):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(num_classes + 1, *shape))

    def forward(self, x_t, t, cond):
        return self.table[cond.labels]


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_model_guidance_learns_the_cfg_guided_prediction(scale):
    """Model guidance's fixed point is classifier-free guidance at scale S: D_c = D_u + S (E[v|c] - D_u).
    Two classes with data means +1 and -1 on the linear path (v = eps - x0): E[v|c] = -mu_c and the
    unconditional mean is 0, so the conditional output must reach -S mu_c (and -mu_c without guidance)."""
    torch.manual_seed(0)
    obj = InterpolantObjective(path="linear", time_sampling="uniform", label_dropout=0.2, train_guidance=scale)
    net = _ClassTable(2, (1, 2, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    mu = torch.tensor([1.0, -1.0])
    for step in range(1500):
        labels = torch.arange(512) % 2
        x0 = mu[labels].view(-1, 1, 1, 1) + 0.05 * torch.randn(512, 1, 2, 2, generator=gen)
        for g in opt.param_groups:
            g["lr"] = 0.02 * (1 - step / 1500)  # decay to 0: the fixed point without the gradient noise
        opt.zero_grad()
        obj.loss(net, x0, Condition.from_labels(labels, 2), generator=gen).backward()
        opt.step()
    table = net.table.detach()
    torch.testing.assert_close(table[2], torch.zeros(1, 2, 2), atol=0.05, rtol=0)  # null: the mean, 0
    torch.testing.assert_close(table[0], torch.full((1, 2, 2), -scale), atol=0.05, rtol=0)
    torch.testing.assert_close(table[1], torch.full((1, 2, 2), scale), atol=0.05, rtol=0)
