"""The U-Net family: diffusers' UNet2DModel behind ditkit's network contract."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.models import build_model, model_config
from ditkit.models.unet import PRESETS, UNet, UNetConfig
from ditkit.objectives import DDPMObjective, InterpolantObjective
from ditkit.samplers import get_sampler, guided
from ditkit.utils import ImageRNG

# A few thousand parameters: every test below runs the real network at a shape that costs milliseconds.
SMALL = dict(block_out_channels=(8, 16, 16), layers_per_block=1, attention=(False, True, True), mid_attention=True,
             attention_head_dim=8, norm_num_groups=4)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These networks are tiny: one thread runs them as fast as two on a quiet machine, and several times
    faster on a busy one, where two threads wait on each other at every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**SMALL, **kw})).eval()


def labels(*ids: int, num_classes: int = 10) -> Condition:
    return Condition.from_labels(torch.tensor(ids), num_classes)


@pytest.mark.parametrize("size,channels,levels", [(28, 1, 3), (32, 3, 3), (28, 1, 2), (16, 3, 1)])
def test_output_has_the_input_shape(size, channels, levels):
    net = small(input_size=size, in_channels=channels, block_out_channels=SMALL["block_out_channels"][:levels],
                attention=SMALL["attention"][:levels])
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([0.0, 500.0, 999.0]), labels(1, 2, 10))
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())


def test_class_embedding_has_a_null_row_and_each_class_changes_the_output():
    net = small()
    table = net.unet.class_embedding.weight
    assert table.shape[0] == 11  # 10 classes + the null class (id 10) that guidance uses
    assert net.null_label == 10
    x, t = torch.randn(1, 1, 28, 28).expand(11, -1, -1, -1), torch.full((11,), 300.0)
    with torch.no_grad():
        out = net(x, t, labels(*range(11)))
    flat = out.flatten(1)
    # every pair of classes (null included) gives a different prediction for the same noisy image
    assert torch.cdist(flat, flat).add(torch.eye(11)).min() > 0
    with pytest.raises(IndexError):  # no id past the null class
        net(x[:1], t[:1], labels(11))


def test_null_condition_is_the_null_class():
    net = small()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100.0, 700.0])
    cond = labels(3, 7)
    with torch.no_grad():
        assert torch.equal(net(x, t, cond.null()), net(x, t, labels(10, 10)))


def test_unconditional_net_has_no_class_embedding_and_ignores_labels():
    net = small(num_classes=0)
    assert net.unet.class_embedding is None and net.null_label is None
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100.0, 700.0])
    with torch.no_grad():
        assert torch.equal(net(x, t, Condition.none(2)), net(x, t, labels(3, 4)))


def test_class_net_without_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="class-conditional"):
        small()(torch.randn(1, 1, 28, 28), torch.tensor([1.0]), Condition.none(1))


def test_time_is_taken_as_given_fractions_included_and_a_scalar_broadcasts():
    net = small()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        a = net(x, torch.tensor([10.0, 10.0]), labels(1, 1))
        b = net(x, torch.tensor([10.5, 10.5]), labels(1, 1))
        c = net(x, torch.tensor(10.0), labels(1, 1))
    assert not torch.equal(a, b)  # the interpolants' 1000 t is not rounded to an integer timestep
    assert torch.equal(a, c)


def test_hidden_at_returns_a_level_or_the_middle_and_the_same_output():
    net = small()
    x, t, cond = torch.randn(2, 1, 28, 28), torch.tensor([5.0, 900.0]), labels(0, 10)
    with torch.no_grad():
        ref = net(x, t, cond)
        shapes = {}
        for k in range(1, net.config.depth + 1):
            out, hidden = net(x, t, cond, hidden_at=k)
            assert torch.equal(out, ref)
            shapes[k] = tuple(hidden.shape)
    # level 1 halves 28 -> 14, level 2 -> 7, level 3 (the last) keeps 7, then the middle block
    assert shapes == {1: (2, 8, 14, 14), 2: (2, 16, 7, 7), 3: (2, 16, 7, 7), 4: (2, 16, 7, 7)}
    with pytest.raises(UsageError, match="hidden_at 5"):
        net(x, t, cond, hidden_at=5)


def test_presets_match_the_dits_they_are_compared_with():
    def count(net: torch.nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    for unet, dit in (("UNet-T", "DiT-T/4"), ("UNet-S", "DiT-S/4")):
        n_unet, n_dit = count(UNet(UNetConfig(**PRESETS[unet]))), count(build_model(model_config(dit)))
        assert abs(n_unet - n_dit) / n_dit < 0.1, (unet, n_unet, dit, n_dit)
    assert count(UNet(UNetConfig(**PRESETS["UNet-T"]))) == 1_164_513  # pins diffusers' block layout


def test_config_round_trips_through_json():
    cfg = UNetConfig(**SMALL, num_classes=4, input_size=32, in_channels=3).validate()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["block_out_channels"] == [8, 16, 16] and d["attention"] == [False, True, True]
    assert UNetConfig.from_dict(d) == cfg


@pytest.mark.parametrize("change,field", [
    (dict(input_size=30), "image size 30"),  # 3 levels halve twice: 30 is not a multiple of 4
    (dict(norm_num_groups=3), "norm_num_groups=3"),
    (dict(attention=(False, True)), "attention="),
    (dict(attention_head_dim=6), "attention_head_dim=6"),
    (dict(block_out_channels=()), "block_out_channels="),
    (dict(in_channels=2), "in_channels=2"),
    (dict(num_classes=-1), "num_classes=-1"),
    (dict(layers_per_block=0), "layers_per_block=0"),
])
def test_bad_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(UsageError, match=field.replace("(", r"\(")):
        UNetConfig(**{**SMALL, **change}).validate()


def test_unknown_config_keys_are_refused_by_name():
    with pytest.raises(UsageError, match="patch_size"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "patch_size": 4})


def test_weights_round_trip_through_safetensors(tmp_path):
    net = small()
    with torch.no_grad():  # move every weight off its initial value, so a missed tensor would show
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    again = UNet(UNetConfig.from_dict(json.loads(json.dumps(net.config.to_dict())))).eval()
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x, t, cond = torch.randn(3, 1, 28, 28), torch.tensor([1.0, 400.0, 999.0]), labels(0, 5, 10)
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), again(x, t, cond))


def test_same_seed_same_network_same_output_and_batches_agree():
    a, b = small(), small()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    x, t, cond = torch.randn(4, 1, 28, 28), torch.tensor([1.0, 250.0, 600.0, 999.0]), labels(0, 3, 9, 10)
    with torch.no_grad():
        out = a(x, t, cond)
        assert torch.equal(out, a(x, t, cond))
        # oneDNN's convolutions block over the batch, so one image's result can move in its last bits with
        # its batch (unlike the DiT, whose products are made batch-invariant): equal to float rounding
        single = torch.cat([a(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1))) for i in range(4)])
    torch.testing.assert_close(single, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", [InterpolantObjective(path="linear"), DDPMObjective(prediction="eps")],
                         ids=["linear", "ddpm"])
def test_objectives_train_it_and_samplers_guide_it(objective):
    net = small().train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    cond = labels(*range(8))
    losses = []
    for _ in range(5):  # the same batch and noise: the loss must fall
        loss = objective.loss(net, x0, cond, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.eval()
    denoiser = guided(objective.denoiser(net), 3.0)
    sigmas = objective.sigma_grid(4, objective.default_spacing)
    rng = ImageRNG([0, 1], "cpu")
    with torch.no_grad():
        x = get_sampler("euler")(denoiser, rng.randn((1, 28, 28)) * sigmas[0], sigmas, cond=labels(2, 7), rng=rng)
    assert x.shape == (2, 1, 28, 28) and bool(torch.isfinite(x).all())


def test_family_presets_build_through_the_registry():
    from ditkit.models.registry import get_family, preset_family

    assert preset_family("UNet-T") == "unet" and preset_family("UNet-S") == "unet"
    cfg = model_config("UNet-T", num_classes=0, input_size=32, in_channels=3)
    assert isinstance(cfg, UNetConfig) and cfg.num_classes == 0 and cfg.input_size == 32
    net = build_model(json.loads(json.dumps(cfg.to_dict())), "unet")
    assert isinstance(net, UNet) and net.config == cfg
    assert get_family("unet").net_cls is UNet
    with pytest.raises(UsageError, match="patch_size"):  # a DiT field is not a U-Net's
        model_config("UNet-T", patch_size=4)


def test_muon_takes_the_hidden_kernels_and_steps_them():
    from ditkit.train.optim import build_optimizer, muon_parameters

    net = small().train()
    names = muon_parameters(net)
    params = dict(net.named_parameters())
    assert names and all(params[n].ndim >= 2 for n in names)
    assert any(params[n].ndim == 4 for n in names) and any(params[n].ndim == 2 for n in names)
    assert not any(n.startswith(("unet.conv_in", "unet.conv_out", "unet.time_embedding", "unet.class_embedding"))
                   or "time_emb_proj" in n for n in names)
    opt = build_optimizer(net, "muon", lr=1e-3, beta2=0.99, weight_decay=0.1, device=torch.device("cpu"))
    before = {n: params[n].detach().clone() for n in names}
    net(torch.randn(2, 1, 28, 28), torch.tensor([3.0, 800.0]), labels(1, 10)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(before[n], params[n]) for n in names)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """UNet-T trained for 2 steps on real digits by `ditkit train`'s function: config.json + safetensors."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "unet"
    return train(TrainConfig(out=str(out), model="UNet-T", batch_size=8, max_steps=2, warmup_steps=1, log_every=1,
                             ckpt_every=2, sample_every=0, sample_steps=1, progress=False, subset=200))


def test_a_trained_unet_run_loads_samples_with_guidance_and_serves(unet_run):
    import asyncio

    import httpx

    from ditkit.runs import load_model, read_run_config
    from ditkit.sampling import generate
    from ditkit.serve import ServeSettings, create_app

    config = read_run_config(unet_run)
    assert config["family"] == "unet" and config["model"]["block_out_channels"] == [32, 64, 64]
    assert (unet_run / "checkpoints" / "step_0000002" / "ema.safetensors").exists()
    model = load_model(unet_run, device="cpu")
    assert isinstance(model.net, UNet) and model.family == "unet" and model.step == 2
    out = generate(model, num=2, labels=[3, 7], steps=2, cfg_scale=2.0)
    assert out["images"].shape == (2, 28, 28, 1) and out["images"].dtype.name == "uint8"
    again = generate(model, num=2, labels=[3, 7], steps=2, cfg_scale=2.0)
    assert (out["images"] == again["images"]).all()  # same seeds, same images

    async def serve() -> httpx.Response:
        app = create_app(model=model, settings=ServeSettings(rate_limit=0.0, timeout_s=60.0, grace_s=10.0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as c:
                for _ in range(1200):  # the app warms its model up before it says ready
                    if app.state.service.state in ("ready", "failed"):
                        break
                    await asyncio.sleep(0.05)
                return await c.post("/v1/generate", json={"labels": [5], "steps": 2, "guidance_scale": 1.5})

    r = asyncio.run(serve())
    assert r.status_code == 200, r.text
