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


# -- mean-image centring (objectives.base.DataMean) ------------------------------------------------
MEAN = torch.tensor([0.5, -0.25, 0.75, -0.6], dtype=torch.float64).view(4, 1, 1)  # a (C, H, W) "image"
VAR = torch.tensor([0.25, 1.0, 2.0, 0.5], dtype=torch.float64).view(1, 4, 1, 1)


class CentredGaussianOracle(torch.nn.Module):
    """The exact network for data N(0, VAR), the centred version of N(MEAN, VAR): it never sees MEAN."""

    def __init__(self, objective):
        super().__init__()
        self.obj = objective

    def forward(self, x_t, tt, cond):
        if isinstance(self.obj, DDPMObjective):  # tt: continuous DDPM timestep; abar by interpolation
            i = tt.double().clamp(0, self.obj.num_timesteps - 1)
            lo = i.floor().long().clamp(max=self.obj.num_timesteps - 2)
            la = self.obj.alphas_cumprod.log()
            abar = (la[lo] + (i - lo) * (la[lo + 1] - la[lo])).exp().view(-1, 1, 1, 1)
            a, s = abar.sqrt(), (1 - abar).sqrt()
            return s * x_t / (a * a * VAR + s * s)  # E[eps | x_t]
        t = tt.double() / 1000
        a, s = (1 - t).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        return a * VAR * x_t / (a * a * VAR + s * s)  # E[x0 | x_t] ("data" prediction)


@pytest.mark.parametrize("name", ["ddpm", "linear"])
def test_centring_turns_the_centred_exact_network_into_the_exact_denoiser(name):
    """With data_mean = MEAN, a network that is exact for the centred data N(0, VAR) gives the exact
    denoiser of N(MEAN, VAR): D(x, sigma) = MEAN + VAR / (VAR + sigma^2) (x - MEAN). Without centring the
    same network would be the denoiser of N(0, VAR), wrong by the whole mean."""
    cfg = {"name": name, "prediction": "eps" if name == "ddpm" else "data", "data_mean": MEAN.tolist()}
    obj = build_objective(cfg)
    D = obj.denoiser(CentredGaussianOracle(obj))
    x = torch.randn(5, 4, 1, 1, dtype=torch.float64) * 3
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0], dtype=torch.float64)
    want = MEAN + VAR / (VAR + sigma.view(-1, 1, 1, 1) ** 2) * (x - MEAN)
    torch.testing.assert_close(D(x, sigma, Condition.none(5)), want, atol=2e-4 if name == "ddpm" else 1e-10, rtol=1e-4)
    plain = build_objective({k: v for k, v in cfg.items() if k != "data_mean"})
    gap = (plain.denoiser(CentredGaussianOracle(plain))(x, sigma, Condition.none(5)) - want).abs().max()
    assert gap > 0.1


@pytest.mark.parametrize("name", ["ddpm", "linear"])
def test_centring_loss_is_the_plain_loss_on_centred_images_and_an_untrained_net_draws_the_mean(name):
    obj = build_objective({"name": name, "data_mean": MEAN.tolist()})
    plain = build_objective({"name": name})
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 1).double()
    wrapped = lambda x, t, c: net(x)  # noqa: E731
    x0 = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    noise = obj.sample_noise(6, (4, 1, 1), torch.Generator().manual_seed(3))
    cond = Condition.none(6)
    torch.testing.assert_close(obj.loss(wrapped, x0, cond, noise), plain.loss(wrapped, x0 - MEAN, cond, noise))
    # the denoiser is the plain one moved by the mean: D(x) = MEAN + D_plain(x - MEAN)
    x, sigma = torch.randn(6, 4, 1, 1, dtype=torch.float64), torch.full((6,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(obj.denoiser(wrapped)(x, sigma, cond),
                               MEAN + plain.denoiser(wrapped)(x - MEAN, sigma, cond))
    # an x0-predicting network that outputs zeros (zero-initialised head) already draws the mean image
    zero_obj = build_objective({"name": name, "prediction": "x0" if name == "ddpm" else "data",
                                "data_mean": MEAN.tolist()})
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(zero_obj.denoiser(zero)(x, sigma, cond), MEAN.expand_as(x))


def test_centring_config_round_trips_and_old_configs_are_unchanged():
    for name in ("ddpm", "linear", "gvp", "vp"):
        plain = build_objective({"name": name})
        assert "data_mean" not in plain.config()  # runs from before centring load and compare as before
        assert build_objective(plain.config()).config() == plain.config()
        cfg = build_objective({"name": name, "data_mean": [[[0.1, -0.123456], [0.999999, -1.0]]]}).config()
        assert cfg["data_mean"] == [[[0.1, -0.123456], [0.999999, -1.0]]]  # the stored numbers, exactly
        assert build_objective(cfg).config() == cfg


def test_mean_image_is_the_training_range_mean():
    from ditkit.data.dataset import ImageDataset
    from ditkit.objectives import DataMean

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 2, 3, 3), generator=g, dtype=torch.uint8)
    data = ImageDataset(images, torch.zeros(37, dtype=torch.long), 0)
    want = data.batch(torch.arange(37))[0].double().mean(0)
    got = torch.tensor(DataMean.stored(data.mean_image(chunk=5)), dtype=torch.float64)
    assert got.shape == (2, 3, 3)
    torch.testing.assert_close(got, want, atol=5e-7, rtol=0)


def test_centring_bad_inputs():
    with pytest.raises(UsageError, match=r"\(C, H, W\)"):
        build_objective({"name": "linear", "data_mean": [0.1, 0.2]})
    with pytest.raises(UsageError, match="finite"):
        build_objective({"name": "ddpm", "data_mean": [[[float("nan")]]]})
    with pytest.raises(UsageError, match="numbers"):
        build_objective({"name": "linear", "data_mean": [[["a"]]]})
    obj = build_objective({"name": "linear", "data_mean": MEAN.tolist()})
    with pytest.raises(UsageError, match=r"shape \(1, 2, 2\).*shape \(4, 1, 1\)"):
        obj.loss(lambda x, t, c: x, torch.zeros(2, 1, 2, 2), Condition.none(2))
    with pytest.raises(UsageError, match="image shape"):
        obj.denoiser(lambda x, t, c: x)(torch.zeros(2, 1, 2, 2), 1.0, Condition.none(2))


def test_dispersive_loss_is_the_log_mean_over_all_pairs():
    """InfoNCE-L2 dispersive loss (Wang & He 2025): log mean_{i,j} exp(-||z_i - z_j||^2 / D), checked
    against the pairwise definition, and at its two limits: one point (log 1 = 0) and points far apart
    (only the B diagonal terms are left: log(1 / B))."""
    from ditkit.objectives.base import dispersive_loss

    z = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = z.flatten(1)
    want = math.log(sum(math.exp(-float((flat[i] - flat[j]).pow(2).sum()) / 12) for i in range(5) for j in range(5)) / 25)
    assert math.isclose(float(dispersive_loss(z)), want, rel_tol=1e-5)
    same = torch.ones(4, 6, requires_grad=True)
    assert abs(float(dispersive_loss(same.detach()))) < 1e-6
    dispersive_loss(same).backward()  # no square root at zero distance: finite gradients
    assert bool(torch.isfinite(same.grad).all())
    far = torch.arange(4, dtype=torch.float64).view(4, 1) * 100.0
    assert math.isclose(float(dispersive_loss(far)), math.log(1 / 4), rel_tol=1e-6)
    # spreading the points apart lowers it
    assert float(dispersive_loss(2 * z)) < float(dispersive_loss(z))
    # under bf16 autocast (how training runs on bf16 hardware) it stays the fp32 value: large, close
    # points must not lose their small distances to bf16 rounding
    big = (100 + torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * 0.1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dispersive_loss(big)
    assert got.dtype == torch.float32 and math.isclose(float(got), float(dispersive_loss(big.float())), rel_tol=1e-6)
    assert float(got) > math.log(1 / 8)


class HiddenNet(torch.nn.Module):
    """A fake network with `hidden_at` like the DiT's: output 0.5 x, 'tokens' 3 x after every block."""

    def forward(self, x, t, cond, hidden_at=None):
        out = 0.5 * x
        return out if hidden_at is None else (out, 3 * x * hidden_at)


@pytest.mark.parametrize("name", ["ddpm", "linear"])
def test_dispersive_term_adds_its_weighted_loss_and_stays_out_of_old_configs(name):
    from ditkit.objectives.base import dispersive_loss

    plain = build_objective({"name": name})
    assert "dispersive" not in plain.config()  # runs from before it existed load and resume as before
    obj = build_objective({"name": name, "dispersive": 0.25, "dispersive_block": 2})
    assert obj.config()["dispersive"] == 0.25 and obj.config()["dispersive_block"] == 2
    assert build_objective(obj.config()).config() == obj.config()
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = obj.sample_noise(6, (1, 4, 4), torch.Generator().manual_seed(2))
    cond = Condition.from_labels(torch.arange(6) % 3, 3)
    net = HiddenNet()
    seen = {}

    def spy(x, t, c, hidden_at=None):
        r = net(x, t, c, hidden_at)
        seen["hidden"] = None if hidden_at is None else r[1]
        return r

    base = plain.loss(spy, x0, cond, noise)
    total = obj.loss(spy, x0, cond, noise)
    torch.testing.assert_close(total, base + 0.25 * dispersive_loss(seen["hidden"]))
    assert float(total) < float(base)  # the term is <= 0 (log of a mean of numbers <= 1)


def test_dispersive_bad_inputs():
    with pytest.raises(UsageError, match=r"--dispersive -1: must be a number >= 0"):
        build_objective({"name": "linear", "dispersive": -1})
    with pytest.raises(UsageError, match="--dispersive nan"):
        build_objective({"name": "ddpm", "dispersive": float("nan")})
    with pytest.raises(UsageError, match="--dispersive-block 0: must be a block number"):
        build_objective({"name": "linear", "dispersive": 0.5, "dispersive_block": 0})


def test_stratified_uniforms_put_one_draw_in_each_stratum_and_stay_uniform():
    from ditkit.objectives.base import stratified_uniforms

    g = torch.Generator().manual_seed(0)
    for B in (1, 7, 64):
        u = stratified_uniforms(B, g)
        assert u.dtype == torch.float64 and u.shape == (B,)
        assert torch.equal(torch.sort((u * B).floor().long()).values, torch.arange(B))  # one per stratum
        assert bool(((u >= 0) & (u < 1)).all())
    # each draw on its own is uniform on [0, 1): any position of the batch, over many batches
    draws = torch.stack([stratified_uniforms(8, g) for _ in range(4000)])  # (4000, 8)
    for col in (draws[:, 0], draws[:, 5]):
        counts = torch.histc(col.float(), bins=10, min=0, max=1)
        assert float((counts - 400).abs().max()) < 80  # ~4 standard deviations of a binomial(4000, 0.1)
    # the batch mean of a smooth function varies far less than with independent draws
    iid = torch.rand(4000, 8, generator=g, dtype=torch.float64)
    assert float(draws.mean(1).var()) < float(iid.mean(1).var()) / 20  # 1/(12 B^3) against 1/(12 B)
    same = [stratified_uniforms(16, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(same[0], same[1])  # one seed, one draw


@pytest.mark.parametrize("time_sampling", ["uniform", "logit-normal"])
def test_stratified_interpolant_times_keep_their_distribution(time_sampling):
    """With stratified_time the training times keep the objective's distribution (the loss stays
    unbiased): the same quantiles as the independent draws, and one time per stratum of its CDF."""
    plain = InterpolantObjective(path="linear", time_sampling=time_sampling)
    strat = InterpolantObjective(path="linear", time_sampling=time_sampling, stratified_time=True)
    g = torch.Generator().manual_seed(1)
    ts = torch.cat([strat.sample_t(32, g) for _ in range(500)])
    tp = torch.cat([plain.sample_t(32, g) for _ in range(500)])
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert torch.allclose(torch.quantile(ts, q), torch.quantile(tp, q), atol=0.015)
    p = strat.path
    u = (strat.sample_t(40, g) - p.t_min) / (p.t_max - p.t_min)  # undo the map onto [t_min, t_max]
    if time_sampling == "logit-normal":  # back through the CDF: Phi(logit u) is one per stratum
        cdf = 0.5 * (1 + torch.erf(torch.logit(u) / math.sqrt(2)))
    else:
        cdf = u
    assert torch.equal(torch.sort((cdf * 40).floor().long()).values, torch.arange(40))


def test_stratified_ddpm_steps_cover_the_range_and_configs_round_trip():
    obj = build_objective({"name": "ddpm", "stratified_time": True})
    g = torch.Generator().manual_seed(2)
    t = obj.sample_noise(50, (1, 4, 4), g)["t"]
    assert t.dtype == torch.long
    assert torch.equal(torch.sort(t // 20).values, torch.arange(50))  # one step in each slice of 20
    for name in ("ddpm", "linear", "gvp", "vp"):
        plain = build_objective({"name": name})
        assert "stratified_time" not in plain.config()  # runs from before it load and compare as before
        on = build_objective({"name": name, "stratified_time": True})
        assert on.config()["stratified_time"] is True and build_objective(on.config()).config() == on.config()


def _posterior_mean_by_hand(x0, eps, t, labels, null, ref, ref_labels):
    """E[x0 | x_t] over {own x0} + the reference images of the row's class (all for a null row), linear path,
    by direct float64 sums."""
    out = []
    for i in range(x0.shape[0]):
        x_t = ((1 - t[i]) * x0[i] + t[i] * eps[i]).double().flatten()
        cands = [x0[i]] + [ref[j] for j in range(len(ref)) if labels[i] == null or ref_labels[j] == labels[i]]
        C = torch.stack(cands).double().flatten(1)
        w = torch.softmax(-((x_t - (1 - t[i]) * C) ** 2).sum(1) / (2 * t[i] ** 2), 0)
        out.append((w @ C).view_as(x0[i]))
    return torch.stack(out)


def test_stable_target_is_the_posterior_mean_over_the_reference_set_of_the_rows_class():
    from ditkit.objectives.base import stable_target_x0

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, 1, 3, 3, generator=g)
    ref, ref_labels = torch.randn(40, 1, 3, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    cond = Condition.from_labels(torch.tensor([0, 1, 2, 3, 0, 1]), 3)  # 3: the null class (a dropped label)
    no_twos = ref_labels.clamp(max=1)  # class 2 without a reference image: its row's mean is its own image
    for t in (0.3, 0.8, 0.95, 0.999):
        tt = torch.full((6,), t, dtype=torch.float64)
        col = tt.view(-1, 1, 1, 1).float()
        for labels in (ref_labels, no_twos):
            got = stable_target_x0(x0, eps, 1 - col, col, cond, ref, labels)
            torch.testing.assert_close(got.double(), _posterior_mean_by_hand(x0, eps, tt, cond.labels, 3, ref, labels),
                                       rtol=0, atol=1e-5)
        assert torch.equal(got[2], x0[2])
        order = torch.argsort(ref_labels, stable=True)  # references sorted by class, as training draws them
        torch.testing.assert_close(stable_target_x0(x0, eps, 1 - col, col, cond, ref[order], ref_labels[order]),
                                   stable_target_x0(x0, eps, 1 - col, col, cond, ref, ref_labels), rtol=0, atol=1e-6)
    # small noise: the own image explains x_t by far, and the mean is that image exactly (no rounding)
    tiny = torch.full((6, 1, 1, 1), 1e-7)
    assert torch.equal(stable_target_x0(x0, eps, 1 - tiny, tiny, cond, ref, ref_labels), x0)
    # pure noise: the likelihoods are equal, so a null row's mean is the plain mean of its own and all references
    one = torch.full((6, 1, 1, 1), 1.0)
    got = stable_target_x0(x0, eps, 0 * one, one, cond, ref, ref_labels)
    torch.testing.assert_close(got[3], (x0[3] + ref.sum(0)) / 41)
    torch.testing.assert_close(got[0], (x0[0] + ref[ref_labels == 0].sum(0)) / (1 + int((ref_labels == 0).sum())))


def test_stable_target_converges_to_the_exact_posterior_mean_of_gaussian_data():
    """Data N(mu, sd^2 I): E[x0 | x_t] is closed-form. Over a large reference set of draws from the data the
    stable target's mean approaches it, far closer than the row's own x0 (the plain target's) is."""
    from ditkit.objectives.base import stable_target_x0

    g = torch.Generator().manual_seed(1)
    D, mu, sd = 2, torch.tensor([0.5, -1.0]), 0.7
    x0 = mu + sd * torch.randn(200, D, generator=g)
    eps = torch.randn(200, D, generator=g)
    errors = {}
    for M in (100, 20_000):
        ref = mu + sd * torch.randn(M, D, generator=g)
        for t in (0.5, 0.9):
            a, s = 1 - t, t
            x_t = a * x0 + s * eps
            exact = mu + a * sd ** 2 / (a * a * sd ** 2 + s * s) * (x_t - a * mu)  # Gaussian conditioning
            got = stable_target_x0(x0, eps, torch.full((200, 1), a), torch.full((200, 1), s), Condition.none(200),
                                   ref, None)
            errors[M, t] = float((got - exact).pow(2).sum(1).mean().sqrt())
            plain = float((x0 - exact).pow(2).sum(1).mean().sqrt())
            assert errors[M, t] < 0.25 * plain, (M, t, errors[M, t], plain)
    for t in (0.5, 0.9):
        assert errors[20_000, t] < 0.05 and errors[20_000, t] < errors[100, t]


def test_stable_target_loss_and_config():
    g = torch.Generator().manual_seed(3)
    obj = build_objective({"name": "linear", "stable_target": 8})
    assert obj.config()["stable_target"] == 8 and build_objective(obj.config()).config() == obj.config()
    for name in ("linear", "gvp", "vp"):
        assert "stable_target" not in build_objective({"name": name}).config()  # older runs compare as before
    x0 = torch.randn(4, 1, 4, 4, generator=g)
    cond = Condition.from_labels(torch.tensor([0, 1, 0, 1]), 2)
    noise = obj.sample_noise(4, (1, 4, 4), g)
    noise["drop"][:] = False
    net = Recorder()
    plain = InterpolantObjective(path="linear").loss(net, x0, cond, noise=noise)
    # references of another class only: every row keeps its own x0, the plain target
    far = (torch.randn(5, 1, 4, 4, generator=g), torch.full((5,), 2))
    assert torch.equal(obj.loss(net, x0, cond, noise=noise, reference=far), plain)
    assert torch.equal(obj.loss(net, x0, cond, noise=noise), plain)  # no reference given: the plain target
    # the zero network's loss is the target's mean square: the posterior mean's target at that x_t
    ref = (torch.randn(30, 1, 4, 4, generator=g), torch.randint(0, 2, (30,), generator=g))
    t = noise["t"].view(-1, 1, 1, 1).float()
    x_t = (1 - t) * x0 + t * noise["eps"]
    x0_hat = _posterior_mean_by_hand(x0, noise["eps"], noise["t"], cond.labels, 2, *ref).float()
    target = (x_t - x0_hat) / t  # the linear path's velocity eps - x0 at the same x_t
    torch.testing.assert_close(obj.loss(net, x0, cond, noise=noise, reference=ref), target.pow(2).mean(),
                               rtol=1e-4, atol=1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="--stable-target"):
            InterpolantObjective(stable_target=bad)
