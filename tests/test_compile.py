"""Compiled inference (`--compile`, `DiT.compile_for_inference`): the same contract as eager inference
(one seed, one image, at any batch size), images close to eager ones, and clear errors."""

from __future__ import annotations

import asyncio
import json
import base64
import io
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main as cli_main
from ditkit.condition import Condition
from ditkit.errors import DitkitError, UsageError
from ditkit.models import build_model, model_config
from ditkit.sampling import generate, load_model, sample_batch, to_uint8
from ditkit.serve.app import ServeSettings, create_app
from ditkit.utils import image_seeds

from conftest import SMALL_SHAPE

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")),
                                reason="torch.compile (inductor) needs a C++ compiler on the CPU")


def test_compiled_dit_image_does_not_depend_on_its_batch():
    """One compiled graph serves every batch size, compiled once: an image alone (padded to the graph's
    smallest batch), three at a time and forty together give the same bits, close to the eager network's."""
    torch.manual_seed(0)
    # DiT-T/4's own shape: the next test compiles the shared fixture's DiT-T/4 from the same kernels (a cold
    # inductor cache compiles each kernel's C++ once: ~70 s here, then ~3 s for the second network)
    net = build_model(model_config("DiT-T/4")).eval().requires_grad_(False)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(40, 1, 28, 28)
    t = torch.rand(40)
    cond = Condition.from_labels(torch.arange(40) % 11, 10)  # 10 = the null class
    with torch.no_grad():
        eager = net(x, t, cond)
    net.compile_for_inference()
    assert net.compiled_min_batch >= 2
    # one graph: neither another batch size nor padding a single image compiles again (it did, ~30 s)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        full = net(x, t, cond)
        assert not torch.equal(full, eager)  # the compiled graph ran (fused arithmetic: other last bits)
        torch.testing.assert_close(full, eager, rtol=1e-4, atol=1e-4)
        for lo in range(0, 40, 3):
            i = torch.arange(lo, min(lo + 3, 40))
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), lo
        for k in (0, 17, 39):
            i = torch.tensor([k])
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), k
    with torch.enable_grad():  # gradients: the eager trunk, exactly
        assert torch.equal(net(x, t, cond), eager)

    training = build_model(model_config("DiT-T/4"))
    with pytest.raises(UsageError, match="inference copy"):
        training.compile_for_inference()


def test_compiled_model_samples_serves_and_keeps_one_seed_one_image(tiny_run, tmp_path):
    """load_model(compile=True), `ditkit sample --compile` and a server given the compiled model: the same
    images at every batch size, and close to the eager model's (not equal: fused arithmetic)."""
    m = load_model(tiny_run, compile=True)
    assert m.compiled and not load_model(tiny_run).compiled
    kw = dict(num=12, labels="all", seed=3, sampler="dpm++2m", steps=6, cfg_scale=2.0)
    a = generate(m, batch_size=12, **kw)
    for bs in (1, 5):
        assert np.array_equal(generate(m, batch_size=bs, **kw)["images"], a["images"]), bs
    e = generate(load_model(tiny_run), batch_size=12, **kw)
    diff = np.abs(a["images"].astype(int) - e["images"].astype(int))
    assert diff.mean() < 0.5  # uint8 levels

    npz = tmp_path / "c.npz"
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(npz), "--num", "12", "--seed", "3",
                     "--steps", "6", "--cfg-scale", "2", "--compile", "--batch-size", "4",
                     "--sampler", "dpm++2m"]) == 0
    assert np.array_equal(np.load(npz)["images"], a["images"])

    async def serve():
        app = create_app(model=m, settings=ServeSettings(rate_limit=0.0, timeout_s=30.0, grace_s=5.0))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                for _ in range(200):
                    if (await c.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert (await c.get("/v1/model")).json()["compiled"] is True
                r = await c.post("/v1/generate", json={"labels": [3, 8], "num_samples": 2, "seed": 4, "steps": 3,
                                                       "guidance_scale": 2.0, "format": "json", "sampler": "dpm++2m"})
                assert r.status_code == 200, r.text
                return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in r.json()["images"]])

    got = asyncio.run(serve())
    want = to_uint8(sample_batch(m, [3, 8], image_seeds(4, 2), sampler="dpm++2m", steps=3, cfg_scale=[2.0, 2.0]))
    np.testing.assert_array_equal(got, want[..., 0])


def test_compile_failure_is_a_clear_error(tiny_run, monkeypatch, capsys):
    """A machine where inductor cannot build its kernels: one line saying so and what to do, no traceback."""
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong compiler output")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(DitkitError, match=r"--compile: torch.compile failed on this machine .*run without --compile"):
        load_model(tiny_run, compile=True)
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", "x.png", "--compile"]) != 0
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed" in err and "Traceback" not in err


def test_compiled_training_trains_and_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    """`ditkit train --compile`: deterministic, so a resumed run repeats an uninterrupted one bit for bit;
    its losses are the eager run's up to fused arithmetic; the setting cannot change on resume; and a
    machine that cannot compile gets one line before any run folder is written."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    kw = dict(model="DiT-T/4", **SMALL_SHAPE, batch_size=16, warmup_steps=5, log_every=1, sample_every=0,
              sample_steps=1, progress=False, subset=512, threads=1, ckpt_every=0, lr_decay=0.0, precision="bf16")
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=6, compile=True, **kw))
    part = TrainConfig(out=str(tmp_path / "part"), max_steps=2, compile=True, **kw)
    train(part)
    part.max_steps = 6
    train(part, resume=True)
    losses = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(full) == losses(tmp_path / "part")
    eager = train(TrainConfig(out=str(tmp_path / "eager"), max_steps=6, **kw))
    a, b = dict(losses(full)), dict(losses(eager))
    assert a != b and all(abs(a[k] - b[k]) < 0.05 * b[k] for k in b)  # the same training, other last bits
    assert json.loads((full / "config.json").read_text())["train"]["compile"] is True
    assert json.loads((full / "config.json").read_text())["compiled"] is True
    with pytest.raises(UsageError, match="trained with compilation.*--compile"):
        train(TrainConfig(out=str(tmp_path / "part"), max_steps=8, compile=False, **kw), resume=True)

    def broken_compile(fn, **k):
        def run(*a, **kk):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert cli_main(["train", "--out", str(tmp_path / "nocc"), "--max-steps", "2", "--subset", "64",
                     "--compile", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "--compile: torch.compile failed" in err and "Traceback" not in err
    assert not (tmp_path / "nocc").exists()


def test_compile_auto_decides_by_run_length_and_falls_back_to_eager(tmp_path, monkeypatch):
    """The default (--compile auto): a short run trains eagerly; a long one compiles, and where the
    model fails to compile it trains eagerly instead, with the same losses as an eager run, and records
    that. A run keeps its compilation on resume."""
    import ditkit.train.resolve as resolve
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    kw = dict(model="DiT-T/4", **SMALL_SHAPE, batch_size=16, warmup_steps=5, log_every=1, sample_every=0,
              sample_steps=1, progress=False, subset=256, threads=1, ckpt_every=0, lr_decay=0.0, max_steps=3)
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    short = train(TrainConfig(out=str(tmp_path / "short"), **kw))
    assert json.loads((short / "config.json").read_text())["compiled"] is False  # 3 steps: not worth compiling

    real_compile = torch.compile

    def compile_but_not_the_dit(fn, **k):  # the toolchain works (check_compiler), the model does not compile
        if isinstance(fn, torch.nn.Module):
            def run(*a, **kk):
                raise RuntimeError("InductorError: LoweringException: an operator inductor cannot lower")
            return run
        return real_compile(fn, **k)

    monkeypatch.setattr(resolve, "AUTO_COMPILE_MIN_STEPS", 2)
    # a long run on an AVX2-only CPU trains eagerly (compiling was measured not to pay there), with AVX-512 it compiles
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "AVX2" in resolve.compile_pays_here()
    avx2 = train(TrainConfig(out=str(tmp_path / "avx2"), **kw))
    assert json.loads((avx2 / "config.json").read_text())["compiled"] is False
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve.compile_pays_here() is None
    monkeypatch.setattr(torch, "compile", compile_but_not_the_dit)
    fallback = train(TrainConfig(out=str(tmp_path / "fallback"), **kw))
    assert json.loads((fallback / "config.json").read_text())["compiled"] is False
    assert losses(fallback) == losses(short)  # the failed attempt left the run's state alone
    with pytest.raises(DitkitError, match="--compile: torch.compile failed"):  # asked for: an error
        train(TrainConfig(out=str(tmp_path / "asked"), compile=True, **kw))
    assert not (tmp_path / "asked").exists()  # it failed before the run folder was written: a retry is free
    with pytest.raises(UsageError, match="trained without compilation.*--no-compile"):
        train(TrainConfig(out=str(tmp_path / "short"), compile=True, **dict(kw, max_steps=4)), resume=True)
    train(TrainConfig(out=str(tmp_path / "short"), **dict(kw, max_steps=4)), resume=True)  # auto keeps eager
    assert len(losses(short)) == 4

