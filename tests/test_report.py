"""`ditkit report` and the viz pieces under it: attention capture, trajectories, features, curves, and the
page itself rendered in headless Chromium. Reports here sample very little (a few images, a few steps)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.errors import DitkitError, UsageError
from ditkit.sampling import generate, load_model
from ditkit.utils import image_seeds
from ditkit.viz.attention import attention_for_image, attention_map, capture_attention, check_layer_head
from ditkit.viz.embeddings import image_features
from ditkit.viz.plots import plot_loss, read_metrics, read_metrics_checked, smooth
from ditkit.viz.report import ReportOptions, build_report, read_eval_results
from ditkit.viz.trajectory import record_trajectory, save_trajectory

CHROMIUM = Path("/usr/bin/chromium")
LIGHT = ["--num-per-ckpt", "3", "--steps", "3", "--no-tsne"]


def light_options(**kw) -> ReportOptions:
    base = dict(num_per_ckpt=4, steps=4, tsne_points=40)
    base.update(kw)
    return ReportOptions(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run tiny batches, where extra threads only contend (on a shared CI machine, badly)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the session's tiny run (weights and logs only), free to break."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("optimizer.safetensors", "rng.safetensors"))
    return dst


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run)


# ---------------------------------------------------------------------------------------------
# Attention capture.
# ---------------------------------------------------------------------------------------------


def test_capture_is_opt_in_and_always_restored(model):
    net = model.net
    x = torch.randn(2, 1, 28, 28)
    t = torch.full((2,), 500.0)
    from ditkit.condition import Condition

    cond = Condition.from_labels(torch.tensor([1, 2]), model.num_classes)
    assert all(b.attn.capture is None for b in net.blocks)
    plain = net(x, t, cond)
    with capture_attention(net, layers=[0, 3]) as store:
        captured = net(x, t, cond)
    assert all(b.attn.capture is None for b in net.blocks)
    assert torch.equal(plain, captured)  # capturing does not change the forward
    N, H = 49, net.blocks[0].attn.num_heads
    assert set(store) == {0, 3} and store[0][0].shape == (2, H, N, N)
    assert torch.allclose(store[3][0].sum(-1), torch.ones(2, H, N), atol=1e-5)
    with pytest.raises(RuntimeError):
        with capture_attention(net):
            raise RuntimeError("boom")
    assert all(b.attn.capture is None for b in net.blocks)  # restored after an error too


def test_missing_layer_or_head_says_what_exists(model):
    with pytest.raises(DitkitError, match=r"layer 9 does not exist.*4 layers \(0-3\), 4 heads each \(0-3\)"):
        check_layer_head(model.net, 9, 0)
    with pytest.raises(DitkitError, match=r"head 7 does not exist.*4 heads each"):
        check_layer_head(model.net, 0, 7)
    with pytest.raises(DitkitError, match="layer 5"):
        with capture_attention(model.net, layers=[5]):
            pass


def test_attention_maps(model):
    img = np.zeros((28, 28, 1), np.uint8)
    img[8:20, 12:16] = 255  # a bar
    res = attention_for_image(model, img, 3)
    assert res.probs.shape == (4, 4, 49, 49) and res.grid == 7
    m = attention_map(res.probs[2], query=24, head=1)
    assert m.shape == (7, 7) and np.isclose(m.sum(), 1.0, atol=1e-4)
    mean = attention_map(res.probs[2])  # mean over queries and heads: still a distribution over keys
    assert np.isclose(mean.sum(), 1.0, atol=1e-4)
    with pytest.raises(DitkitError, match="query patch 49 does not exist"):
        attention_map(res.probs[0], query=49)


# ---------------------------------------------------------------------------------------------
# Trajectories and features.
# ---------------------------------------------------------------------------------------------


def test_trajectory_ends_on_the_generated_image(model):
    traj = record_trajectory(model, [4], image_seeds(7, 1), sampler="dpm++2m", steps=5, cfg_scale=2.0, at=[0, 2, 4])
    assert traj.steps == [0, 2, 4] and traj.x_t.shape == (3, 1, 28, 28, 1) and traj.x0.shape == traj.x_t.shape
    assert traj.sigmas[0] > traj.sigmas[1] > traj.sigmas[2]
    ref = generate(model, num=1, labels=[4], seed=7, sampler="dpm++2m", steps=5, cfg_scale=2.0)["images"][0]
    assert np.array_equal(traj.final[0], ref)  # same seed and label as `ditkit sample`: the same picture
    with pytest.raises(UsageError, match="steps 0..4"):
        record_trajectory(model, [4], [1], steps=5, at=[5])


def test_save_trajectory_png_and_gif(model, tmp_path):
    png = save_trajectory(model, 2, 0, tmp_path / "t.png", sampler="dpm++2m", steps=4)
    assert Image.open(png).size[0] > 200
    gif = save_trajectory(model, 2, 0, tmp_path / "t.gif", sampler="euler", steps=4)
    with Image.open(gif) as im:
        assert im.n_frames == 5  # every step, then the output
    with pytest.raises(UsageError, match=r"\.png .* or \.gif"):
        save_trajectory(model, 2, 0, tmp_path / "t.jpg", sampler="dpm++2m", steps=4)
    with pytest.raises(UsageError, match="class ids must be in 0..9"):
        save_trajectory(model, 12, 0, tmp_path / "t2.png", sampler="dpm++2m", steps=4)


def test_image_features_leave_no_hooks(model):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    final = image_features(model, imgs, "final", batch_size=4)
    patch = image_features(model, imgs, "patch")
    assert final.shape == (6, 128) and patch.shape == (6, 49 * 128)
    assert not model.net.final_layer._forward_pre_hooks and not model.net.x_embedder._forward_hooks
    assert np.allclose(image_features(model, imgs[:2], "final"), final[:2], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reading a run.
# ---------------------------------------------------------------------------------------------


def test_metrics_and_eval_read_tolerantly(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "loss": 0.')  # a run killed mid-line
    recs, bad = read_metrics_checked(run_copy)
    assert bad == 1 and len(recs) == len(read_metrics(run_copy)) == 8
    assert plot_loss(run_copy).exists()  # the training loop's call keeps working
    ev = run_copy / "eval"
    ev.mkdir(exist_ok=True)
    (ev / "a.json").write_text(json.dumps({"checkpoint_step": 20, "sampler": "dpm++2m", "steps": 20, "cfg_scale": 2,
                                           "fid": {"value": 41.5, "ci_low": 39.0, "ci_high": 44.0, "n": 2000},
                                           "class_accuracy": {"value": 0.42, "n": 2000}}))
    (ev / "b.json").write_text(json.dumps({"checkpoint_step": 40, "fid": 30.0, "fid_ci": [28, 32]}))
    (ev / "half.json").write_text('{"checkpoint_step": 40, "fid": {"val')
    res, notes = read_eval_results(run_copy)
    assert [(r["step"], r["fid"], r["fid_lo"], r["acc"]) for r in res] == [(20, 41.5, 39.0, 0.42), (40, 30.0, 28.0, None)]
    assert len(notes) == 1 and "half.json: unreadable" in notes[0]
    assert res[0]["setting"] == "dpm++2m, 20 steps, cfg 2, balanced labels"  # written before labels_spec existed
    # settings that change the images are named, so two evaluations never read as one
    (ev / "c.json").write_text(json.dumps({"checkpoint_step": 20, "sampler": "dpm++2m-sde", "steps": 20, "cfg_scale": 1.25,
                                           "spacing": "karras", "weights": "model", "compiled": True,
                                           "labels_spec": "prior",
                                           "sampler_options": {"s_noise": 1.03}, "fid": 7.8}))
    res, _ = read_eval_results(run_copy)
    assert next(r for r in res if r["file"] == "eval/c.json")["setting"] == "dpm++2m-sde, 20 steps, cfg 1.25, karras grid, raw weights, compiled, s_noise=1.03"


@pytest.mark.parametrize("log", [False, True])
def test_smoothed_loss_follows_a_falling_curve(log):
    """The smoothed curve of a falling, noisy loss lies on the curve, not above it: an average's lag
    put the old smoothing above the raw loss at almost every point of a 10-minute run."""
    rng = np.random.default_rng(0)
    step = np.arange(50, 7050, 50, dtype=float)  # a 7,000-step run logged every 50 steps
    true = 0.05 + 0.5 * np.exp(-step / 1500)
    raw = true * (1 + 0.05 * rng.standard_normal(len(step)))
    s = smooth(raw, step, log=log)
    above = (s > raw).mean()
    assert 0.35 < above < 0.65, f"smoothed above the raw loss at {above:.0%} of the points"
    assert abs(np.median(s / true - 1)) < 0.01  # no systematic offset from the underlying curve
    assert np.abs(s - true).mean() < 0.6 * np.abs(raw - true).mean()  # and it does smooth
    # exact on a straight line and on an exponential decay (in log space), ends included
    line = 3.0 - 0.001 * step
    assert np.allclose(smooth(line, step), line)
    assert np.allclose(smooth(np.exp(-step / 900), step, log=True), np.exp(-step / 900))


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_builds_offline_and_renders_in_chromium(run_copy, tmp_path):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "lo')
    (run_copy / "eval").mkdir(exist_ok=True)
    (run_copy / "eval" / "step20.json").write_text(json.dumps(
        {"checkpoint_step": 20, "sampler": "dpm++2m", "steps": 20, "cfg_scale": 2.0,
         "fid": {"value": 55.25, "ci_low": 50.0, "ci_high": 60.0, "n": 2000}, "class_accuracy": {"value": 0.3}}))
    (run_copy / "bench").mkdir()
    Image.new("RGB", (40, 30), "red").save(run_copy / "bench" / "nfe.png")

    rep = build_report(run_copy, options=light_options())
    assert rep.path == run_copy / "report.html"
    assert {"curves", "samples", "trajectory", "attention", "attention_layers", "tsne", "eval"} <= set(rep.figures)
    page = rep.path.read_text()
    # offline: nothing fetched from the network, every image a relative file that exists
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    srcs = _img_srcs(page)
    assert len(srcs) >= 8 and all(not s.startswith("/") and (run_copy / s).is_file() for s in srcs)
    assert "bench/nfe.png" in srcs
    assert "55.25 [50.00, 60.00]" in page  # step 20 was evaluated
    assert "ditkit eval --ckpt" in page and "step_0000040" in page  # step 40 was not: the command to run
    assert any("1 unreadable line" in n for n in rep.notes)
    samples = np.asarray(Image.open(rep.figures["samples"]))
    assert samples.std() > 10

    if not CHROMIUM.exists():
        pytest.skip("headless render skipped: /usr/bin/chromium is missing (apt-get install chromium; "
                    "`make test` runs scripts/ensure-chromium.sh)")
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           rep.path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-800:]}"
    pix = np.asarray(Image.open(shot).convert("RGB"))
    assert pix.shape[:2] == (2000, 1200)
    assert pix.std() > 20, "the rendered page is blank"
    assert len(np.unique(pix.reshape(-1, 3)[::7], axis=0)) > 50, "the rendered page has almost no colours"
    ink = (np.abs(pix.astype(int) - pix[0, 0]).sum(-1) > 30).mean()  # share of pixels unlike the background
    assert ink > 0.03, f"only {ink:.1%} of the page differs from its background"


def test_report_cli_on_broken_runs(run_copy, tmp_path, capsys):
    # a missing folder: a clear error, nothing written
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err
    # a folder that is no run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "not a ditkit run folder" in err and "notes.txt" in err
    # bad flags: exit code 2
    assert main(["report", str(run_copy), "--image", "5", "--num-per-ckpt", "3"]) == 2
    assert "--image 5" in capsys.readouterr().err
    # a device that does not exist: refused before anything is sampled or written, not a two-figure report
    assert main(["report", str(run_copy), "--device", "bogus"]) == 2
    assert "--device 'bogus'" in capsys.readouterr().err and not (run_copy / "report.html").exists()

    # a layer that does not exist: the report still builds, and says what exists
    assert main(["report", str(run_copy), "--layer", "9", "--max-checkpoints", "1", *LIGHT]) == 0
    cap = capsys.readouterr()
    assert "wrote" in cap.out and "attention layer 9 does not exist" in cap.err and "4 layers (0-3)" in cap.err
    page = (run_copy / "report.html").read_text()
    assert "attention layer 9 does not exist" in page and "report_files/samples.png" in page

    # no config.json: curves only, with the reason
    cfg = run_copy / "config.json"
    cfg.rename(run_copy / "config.json.bak")
    assert main(["report", str(run_copy), *LIGHT]) == 0
    cap = capsys.readouterr()
    assert "config.json is missing" in cap.err
    page = (run_copy / "report.html").read_text()
    assert "report_files/curves.png" in page and "report_files/samples.png" not in page
    (run_copy / "config.json.bak").rename(cfg)

    # no checkpoints: curves and the evaluation hint, no model sections
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").mkdir()
    assert main(["report", str(run_copy), *LIGHT, "-q"]) == 0
    cap = capsys.readouterr()
    assert "no complete checkpoint" in cap.err
    page = (run_copy / "report.html").read_text()
    assert "report_files/curves.png" in page and "No samples" in page


def test_report_of_a_unet_run_says_which_sections_do_not_apply(tmp_path):
    """A U-Net has no transformer blocks or patch tokens: the report draws its curves and samples, and
    says that attention maps and the feature t-SNE do not apply, instead of failing."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    run = train(TrainConfig(out=str(tmp_path / "unet"), model="UNet-T", max_steps=3, batch_size=8, subset=64,
                            warmup_steps=1, log_every=1, ckpt_every=0, sample_every=0, sample_steps=1,
                            progress=False, threads=1, compile=False))
    assert json.loads((run / "config.json").read_text())["family"] == "unet"
    rep = build_report(run, options=light_options(num_per_ckpt=2, steps=2, tsne_points=20))
    assert {"curves", "samples"} <= set(rep.figures)
    assert not {"attention", "attention_layers", "tsne"} & set(rep.figures)
    page = rep.path.read_text()
    assert page.count("do not apply to this model (family &#x27;unet&#x27;)") == 2
