"""Training: checkpoints, bit-exact resume (also after kill -9), per-image seeds, the CLI's errors,
and an integration run on real MNIST digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit.cli import main as cli_main
from ditkit.errors import DitkitError, UsageError
from ditkit.sampling import generate, load_model
from ditkit.runs import latest_checkpoint, list_checkpoints, load_weights
from ditkit.train.config import TrainConfig
from ditkit.train import loop, resolve
from ditkit.train.loop import lr_for_batch, train

from conftest import SMALL_SHAPE, SMALL_SHAPE_ARGS

SMALL = dict(model="DiT-T/4", **SMALL_SHAPE, batch_size=16, warmup_steps=5, log_every=1, sample_every=0,
             progress=False, subset=512, threads=1,
             sample_steps=1)  # one step for the end-of-run grid (the default 10: ~8 s a run)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_checkpoint_round_trip(tiny_run):
    ck = latest_checkpoint(tiny_run)
    assert ck.name == "step_0000040" and [p.name for p in list_checkpoints(tiny_run)] == ["step_0000020", "step_0000040"]
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["depth"] == 4 and cfg["objective"]["name"] == "linear" and cfg["data"]["shape"] == [1, 28, 28]
    from ditkit.data import load_dataset
    labels = load_dataset("mnist").labels[:2000]  # the fixture trains on the first 2,000 digits
    assert cfg["data"]["class_counts"] == torch.bincount(labels, minlength=10).tolist()
    m = load_model(tiny_run, weights="model")
    ref = load_weights(ck, "model")
    for k, v in m.net.state_dict().items():
        assert torch.equal(v, ref[k]), k
    ema = load_model(tiny_run)  # EMA by default, and it differs from the raw weights
    assert any(not torch.equal(a, b) for a, b in zip(ema.net.state_dict().values(), m.net.state_dict().values()))
    rec = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "epoch", "loss", "grad_norm", "lr", "img_per_s", "elapsed_s"} <= set(rec)
    assert (tiny_run / "samples").is_dir()


LIGHTNING = dict(norm="rmsnorm", qk_norm=True, mlp="swiglu", rope=True)


@pytest.mark.parametrize("train_guidance,center,dispersive,parts", [
    (1.0, "none", 0.0, {}), (1.5, "none", 0.0, {}), (1.0, "mean", 0.0, {}), (1.0, "none", 0.25, {}),
    (1.0, "none", 0.0, LIGHTNING)])
def test_resume_is_bit_exact(tmp_path, train_guidance, center, dispersive, parts):
    # Extending a run (max-steps 5 -> 12) moves a planned lr decay, so this test trains without one;
    # test_resume_after_kill_9 resumes under the default decay with an unchanged plan. Model guidance
    # (1.5) adds a no-grad forward to every step: still deterministic. Centring stores the mean image of
    # the images trained on (the first 512) in config.json, and resuming recomputes the same one. The
    # dispersive loss (0.25) asks the network for its middle block's tokens too. LightningDiT's block parts
    # are stored in the model's config, and a loaded model samples with them.
    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0, train_guidance=train_guidance, center=center, dispersive=dispersive,
              **parts)
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=12, **kw))
    model = json.loads((full / "config.json").read_text())["model"]
    assert {k: model[k] for k in LIGHTNING} == (parts or dict(norm="layernorm", qk_norm=False, mlp="gelu", rope=False))
    if parts:
        loaded = load_model(full)
        assert loaded.net.rope_cos is not None and loaded.net.blocks[0].attn.q_norm is not None
        assert generate(loaded, num=2, labels=[3], sampler="euler", steps=2, seed=0)["images"].shape == (2, 28, 28, 1)
    objective = json.loads((full / "config.json").read_text())["objective"]
    assert objective.get("train_guidance", 1.0) == train_guidance
    assert (objective.get("dispersive"), objective.get("dispersive_block")) == ((0.25, 1) if dispersive else (None, None))
    if center == "mean":
        from ditkit.data import load_dataset
        from ditkit.objectives import DataMean
        assert objective["data_mean"] == DataMean.stored(load_dataset("mnist").subset(512).mean_image())
        digit = load_model(full, weights="model")  # samples through the centred denoiser
        assert digit.objective.centring.mean is not None and digit.objective.centring.mean.shape == (1, 28, 28)
        out = generate(digit, num=2, labels=[3], sampler="euler", steps=2, seed=0)
        assert out["images"].shape == (2, 28, 28, 1) and out["images"].dtype == np.uint8
    else:
        assert "data_mean" not in objective
    part = TrainConfig(out=str(tmp_path / "part"), max_steps=5, **kw)
    train(part)
    part.max_steps = 12
    train(part, resume=True)
    assert losses(full) == losses(tmp_path / "part")
    a, b = load_weights(latest_checkpoint(full), "ema"), load_weights(latest_checkpoint(tmp_path / "part"), "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_a_run_from_before_the_block_parts(tmp_path):
    """A run written before --norm, --qk-norm, --mlp and --rope existed (its config.json lacks them) was
    DiT's own blocks: it resumes, bit-exactly, with the settings it was started with."""
    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0)
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=6, **kw))
    part = TrainConfig(out=str(tmp_path / "part"), max_steps=3, **kw)
    train(part)
    path = tmp_path / "part" / "config.json"
    config = json.loads(path.read_text())
    for key in TrainConfig.BLOCK_FIELDS[1:]:
        del config["model"][key], config["train"][key]
    path.write_text(json.dumps(config))
    part.max_steps = 6
    train(part, resume=True)
    assert losses(full) == losses(tmp_path / "part")


def test_cli_resume_keeps_the_runs_settings(tmp_path, capsys):
    """`ditkit train --out R --resume` alone continues R with the settings R was started with (seed, lr,
    block parts, stratified times, subset, ...), bit-exactly, also where R used options that left the
    command line for ditkit.experimental; a setting given anew that differs is refused by name."""
    from ditkit import experimental

    kw = dict(subset=256, batch_size=16, warmup_steps=2, lr_decay=0.0, lr=5e-4, seed=3, stratified_time=True,
              norm="rmsnorm", mlp="swiglu", sample_every=0, sample_steps=1, log_every=1, ckpt_every=0,
              progress=False, threads=1, compile=False)
    experimental.train(experimental.train_config(out=str(tmp_path / "full"), max_steps=5, **kw))
    experimental.train(experimental.train_config(out=str(tmp_path / "part"), max_steps=2, **kw))
    assert cli_main(["train", "--out", str(tmp_path / "part"), "--max-steps", "5", "--resume", "--no-progress"]) == 0
    assert "(batch 16, lr 0.0005)" in capsys.readouterr().out  # the run's batch and lr, in its last line
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert config["objective"]["stratified_time"] is True and config["model"]["norm"] == "rmsnorm"
    capsys.readouterr()
    assert cli_main(["train", "--out", str(tmp_path / "part"), "--max-steps", "7", "--resume", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "seed" in err and "differ from the run's config.json" in err and "Traceback" not in err


def trained_and_resumed_alike(tmp_path: Path, kw: dict, steps: int = 8, stop: int = 3) -> Path:
    """Train `steps` steps in one go (tmp_path/full) and, with the same settings, `stop` steps then resumed to
    `steps` (tmp_path/part); assert both logged the same losses bit for bit. Returns the full run."""
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=steps, **kw))
    part = TrainConfig(out=str(tmp_path / "part"), max_steps=stop, **kw)
    train(part)
    part.max_steps = steps
    train(part, resume=True)
    assert losses(full) == losses(tmp_path / "part")
    return full


def test_stable_target_run_draws_its_references_from_the_run_and_resumes_bit_exactly(tmp_path):
    """--stable-target M: each step draws M reference images with the run's generator (after the batch's
    noise), so the run stays deterministic and resumes bit-exactly; the setting is kept in the objective's
    config, and the target differs from the plain run's from the first step."""
    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0, stable_target=32)
    full = trained_and_resumed_alike(tmp_path, kw)
    assert json.loads((full / "config.json").read_text())["objective"]["stable_target"] == 32
    plain = train(TrainConfig(out=str(tmp_path / "plain"), max_steps=2, **dict(kw, stable_target=0)))
    assert "stable_target" not in json.loads((plain / "config.json").read_text())["objective"]
    assert losses(plain)[0] != losses(full)[0]


def test_stable_target_auto_is_on_for_interpolants_and_off_for_ddpm_and_for_runs_from_before_it(tmp_path):
    from ditkit.train.config import STABLE_TARGET_REFS

    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0)
    for objective, refs in (("linear", STABLE_TARGET_REFS), ("ddpm", 0)):
        run = train(TrainConfig(out=str(tmp_path / objective), max_steps=1, objective=objective, **kw))
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["stable_target"] == refs  # what auto became
        assert config["objective"].get("stable_target", 0) == refs
    # a run written before the option existed (no stable_target in its config.json) resumes without it
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=4, stable_target=0, **kw))
    old = tmp_path / "old"
    train(TrainConfig(out=str(old), max_steps=2, stable_target=0, **kw))
    config = json.loads((old / "config.json").read_text())
    del config["train"]["stable_target"]
    (old / "config.json").write_text(json.dumps(config))
    train(TrainConfig(out=str(old), max_steps=4, progress=False), resume=True)
    assert losses(old) == losses(full)
    assert "stable_target" not in json.loads((old / "config.json").read_text())["objective"]


def test_bf16_autocast_trains_and_resumes_bit_exactly(tmp_path):
    """--precision bf16 on the CPU: matrix products in bf16 (attention's softmax in fp32), still deterministic."""
    kw = dict(SMALL, precision="bf16", ckpt_every=0, lr_decay=0.0)
    full = trained_and_resumed_alike(tmp_path, kw)
    assert json.loads((full / "config.json").read_text())["precision"] == "bf16"
    fp32 = train(TrainConfig(out=str(tmp_path / "fp32"), max_steps=8, **dict(kw, precision="fp32")))
    a, b = dict(losses(full)), dict(losses(fp32))
    assert a != b and all(abs(a[k] - b[k]) < 0.05 * b[k] for k in b)  # bf16 rounding, the same training


def test_a_bf16_runs_sample_grids_are_drawn_in_bf16(tmp_path):
    """A run that trains in bf16 draws its sample grids from a bf16 copy of its EMA: pixel for pixel what
    `ditkit sample --precision bf16` draws from the run with the grid's seeds, not the fp32 model's draw."""
    from PIL import Image

    from ditkit.viz.grids import save_grid

    run = train(TrainConfig(out=str(tmp_path / "run"), max_steps=3, **dict(SMALL, precision="bf16", ckpt_every=0,
                                                                          sample_steps=2)))
    grid = np.asarray(Image.open(run / "samples" / "step_0000003.png"))
    drawn = {}
    for precision in ("bf16", "fp32"):
        out = generate(load_model(run, precision=precision), num=100, labels=None, seed=loop.GRID_SEED, batch_size=100,
                       sampler=TrainConfig.sample_sampler, steps=2, cfg_scale=TrainConfig.sample_cfg_scale)
        drawn[precision] = np.asarray(Image.open(save_grid(out["images"], tmp_path / f"{precision}.png", nrow=10)))
    assert np.array_equal(grid, drawn["bf16"])
    assert not np.array_equal(grid, drawn["fp32"])


def test_plan_points_double_then_follow_the_decay_to_its_end():
    """Re-plans: at 2x the step while the lr is constant, at the decay's start, then each eighth of the
    remaining steps (so a machine that slows near the end is followed), until few steps remain."""
    from ditkit.train.loop import LAST_REPLAN_STEPS, next_plan_step
    assert next_plan_step(30, 1000, 0.3, in_decay=False) == 60
    assert next_plan_step(480, 1000, 0.3, in_decay=False) == 700  # 960 would pass the decay's start
    points, step = [], 700
    while step is not None:
        points.append(step)
        step = next_plan_step(step, 1000, 0.3, in_decay=True)
    gaps = [b - a for a, b in zip(points, points[1:])]
    assert gaps[0] == 300 // 8 and all(g >= LAST_REPLAN_STEPS // 2 for g in gaps)
    assert all(b <= a for a, b in zip(gaps, gaps[1:]))  # denser towards the end
    assert 1000 - points[-1] < LAST_REPLAN_STEPS <= 1000 - points[-2] and len(points) > 10


def test_time_limited_run_plans_its_steps_and_ends_decayed(tmp_path):
    """--max-minutes alone: the step count is planned (and re-planned) from the measured speed, so the
    lr decay ends with the run, inside the budget, with most of the budget used."""
    budget_s = 12.0
    run = train(TrainConfig(out=str(tmp_path / "t"), max_minutes=budget_s / 60, ckpt_every=0, **dict(SMALL, log_every=1)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    last = rows[-1]
    assert last["elapsed_s"] <= budget_s + 1.0
    assert last["elapsed_s"] >= 0.6 * budget_s, "the plan left much of the budget unused"
    lr_max = lr_for_batch(SMALL["batch_size"])
    assert last["lr"] < 0.15 * lr_max  # decayed to (near) zero at the planned end
    # re-plans during the decay bend the line, never make the lr jump
    lrs = [r["lr"] for r in rows if r["step"] > SMALL["warmup_steps"]]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), "the lr rose after the warm-up"
    assert max(a - b for a, b in zip(lrs, lrs[1:])) < 0.1 * lr_max, "the lr jumped at a re-plan"
    # the plan ends the run, or the deadline a few steps before it (the machine's speed varies)
    assert 0.9 * state["planned_steps"] <= last["step"] <= state["planned_steps"]


def test_lr_auto_scales_with_the_square_root_of_the_batch():
    assert lr_for_batch(64) == pytest.approx(2.8e-3)
    assert lr_for_batch(32) == pytest.approx(2.8e-3 / 2 ** 0.5) and lr_for_batch(16) == pytest.approx(1.4e-3)


@pytest.mark.parametrize("step_s,want", [
    (lambda b: 0.02, 64),  # a fast host: 30,000 steps in 10 minutes at 64
    (lambda b: 0.19, 64),  # 3,150 steps at 64
    (lambda b: {64: 0.375, 32: 0.22}[b], 32),  # a slow AVX2 host: ~1,600 and ~2,700 steps
    (lambda b: 5.0, 32),  # too slow for either: the smaller
])
def test_auto_batch_is_the_first_whose_measured_speed_buys_enough_steps(monkeypatch, step_s, want):
    asked = []
    monkeypatch.setattr(resolve, "seconds_per_step", lambda mcfg, obj, shape, batch, device, amp, **kw: asked.append(batch)
                        or step_s(batch))
    cfg = TrainConfig(max_minutes=10)
    config = dict(model={}, objective=dict(name="linear", prediction="velocity"), data=dict(shape=[1, 28, 28]),
                  precision="fp32")
    assert resolve.auto_batch_size(cfg, config, torch.device("cpu"), 1, 50_000) == want
    assert asked == [b for b in resolve.AUTO_BATCHES if b >= want]  # measured until one sufficed
    # a run of a set length, or under DDP, takes 64 without measuring anything
    asked.clear()
    for c, ws in ((TrainConfig(max_minutes=10, max_steps=100), 1), (TrainConfig(epochs=1), 1), (cfg, 2)):
        assert resolve.auto_batch_size(c, config, torch.device("cpu"), ws, 50_000) == 64
    assert asked == []


def test_auto_batch_and_lr_are_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    """The batch and lr that auto became are written into the run; the measurement counts against the
    time budget; --resume trains on with them."""
    def slow_measurement(mcfg, objective, shape, batch, device, amp, **kw):
        time.sleep(0.75)
        return 1.0  # 6 steps in the budget at every batch: the smaller is taken
    monkeypatch.setattr(resolve, "seconds_per_step", slow_measurement)
    small = {k: v for k, v in SMALL.items() if k != "batch_size"}
    budget_s = 6.0
    run = train(TrainConfig(out=str(tmp_path / "a"), max_minutes=budget_s / 60, ckpt_every=0, **small))
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["batch_size"] == 32 and cfg["lr"] == pytest.approx(2.8e-3 / 2 ** 0.5)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["elapsed_s"] >= 1.5  # the run's clock started before the two measurements
    assert rows[-1]["elapsed_s"] <= budget_s + 1.0  # and they were paid out of the budget
    steps = rows[-1]["step"]
    train(TrainConfig(out=str(run), max_steps=steps + 3, **small), resume=True)
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 32
    assert losses(run)[-1][0] == steps + 3


def test_seconds_per_step_measures_a_training_step():
    from ditkit.models import model_config
    from ditkit.objectives import build_objective
    mcfg = model_config("DiT-T/4", input_size=28, in_channels=1, num_classes=10, depth=2, hidden_size=64).to_dict()
    objective = build_objective(dict(name="linear", prediction="velocity"))
    t = loop.seconds_per_step(mcfg, objective, (1, 28, 28), 8, torch.device("cpu"), False, steps=2, warmup=1)
    assert 0 < t < 5


def test_precision_resolution():
    from ditkit.utils import native_bf16, resolve_precision
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    with pytest.raises(UsageError, match="allowed auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_resume_after_kill_9(tmp_path):
    """Kill the trainer with SIGKILL mid-run, resume from the last checkpoint: the same loss at every step."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "ditkit", "train", "--subset", "512", "--batch-size", "16", "--warmup-steps", "5",
            "--log-every", "1", "--sample-every", "0", "--sample-steps", "1", "--no-progress", "--threads", "1",
            *SMALL_SHAPE_ARGS, "--max-steps", "30"]
    ref = tmp_path / "ref"  # the uninterrupted run, alongside the one to kill (one thread each, 2 cores)
    ref_proc = subprocess.Popen(args + ["--out", str(ref), "--ckpt-every", "0"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(run), "--ckpt-every", "4"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = latest_checkpoint(run) if (run / "checkpoints").exists() else None
        if ck is not None and int(ck.name.split("_")[1]) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert 8 <= int(latest_checkpoint(run).name.split("_")[1]) < 30
    r = subprocess.run(args + ["--out", str(run), "--ckpt-every", "4", "--resume"], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert ref_proc.wait(timeout=120) == 0, ref_proc.stderr.read().decode()
    assert losses(ref) == losses(run)


def test_resume_refuses_changed_settings(tiny_run, tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "r"), max_steps=2, ckpt_every=0, **SMALL))
    with pytest.raises(UsageError, match="lr"):
        train(TrainConfig(out=str(run), max_steps=4, ckpt_every=0, **{**SMALL, "lr": 5e-4}), resume=True)
    with pytest.raises(DitkitError, match="already holds a run"):
        train(TrainConfig(out=str(run), max_steps=4, ckpt_every=0, **SMALL))
    with pytest.raises(DitkitError, match="not a run folder"):
        train(TrainConfig(out=str(tmp_path / "nothing"), max_steps=4, **SMALL), resume=True)


def test_resume_of_a_run_without_class_counts(tmp_path):
    """A run written before ditkit recorded the class counts resumes, and then records them."""
    run = train(TrainConfig(out=str(tmp_path / "r"), max_steps=2, ckpt_every=0, **SMALL))
    cfg_path = run / "config.json"
    cfg = json.loads(cfg_path.read_text())
    counts = cfg["data"].pop("class_counts")
    assert sum(counts) == 512
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="--labels prior: this run does not record"):
        generate(load_model(run), num=4, labels="prior", steps=2)
    train(TrainConfig(out=str(run), max_steps=3, ckpt_every=0, **SMALL), resume=True)
    assert json.loads(cfg_path.read_text())["data"]["class_counts"] == counts
    assert generate(load_model(run), num=4, labels="prior", steps=2)["labels"].shape == (4,)


def test_labels_prior_draws_the_training_mix_in_exact_counts(tiny_run):
    from ditkit.sampling import parse_labels, stratified_labels

    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    labs = np.array(stratified_labels(counts, 3000))
    share = np.bincount(labs, minlength=10)
    assert share.sum() == 3000 and np.abs(share - np.array(counts) / sum(counts) * 3000).max() < 1
    for n in (100, 250, 1000):  # every batch-sized prefix holds nearly the same mix
        prefix = np.bincount(labs[:n], minlength=10)
        assert np.abs(prefix - np.array(counts) / sum(counts) * n).max() <= 1.5, (n, prefix)
    assert stratified_labels([0, 5, 0], 4) == [1, 1, 1, 1]
    assert sorted(stratified_labels([1, 1, 2], 3)) == [0, 1, 2]  # 0.75, 0.75, 1.5: largest remainders first
    with pytest.raises(UsageError, match="class counts"):
        stratified_labels([0, 0], 3)
    with pytest.raises(UsageError, match="records 2 class counts for 10 classes"):
        parse_labels("prior", 5, 10, [3, 4])
    assert parse_labels("prior", 3, 0) == [-1, -1, -1]  # an unconditional model has one distribution
    m = load_model(tiny_run)
    res = generate(m, num=30, labels="prior", seed=1, steps=2)
    assert np.array_equal(res["labels"], stratified_labels(m.class_counts, 30))


def test_shape_flags_change_the_preset_and_are_kept_in_the_run(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "r"), max_steps=2, ckpt_every=0, **dict(SMALL, depth=3, width=32)))
    m = json.loads((run / "config.json").read_text())["model"]
    assert (m["depth"], m["hidden_size"], m["num_heads"], m["patch_size"]) == (3, 32, 2, 4)
    net = load_model(run).net
    assert len(net.blocks) == 3 and net.blocks[0].attn.num_heads == 2
    with pytest.raises(UsageError, match="depth"):  # the shape is part of the run: no resuming into another
        train(TrainConfig(out=str(run), max_steps=4, ckpt_every=0, **dict(SMALL, depth=2, width=32)), resume=True)
    preset = train(TrainConfig(out=str(tmp_path / "p"), max_steps=1, ckpt_every=0,
                               **{k: v for k, v in SMALL.items() if k not in SMALL_SHAPE}))
    m = json.loads((preset / "config.json").read_text())["model"]
    assert (m["depth"], m["hidden_size"], m["num_heads"], m["patch_size"]) == (4, 128, 4, 4)  # DiT-T/4 itself


@pytest.mark.parametrize("sampler,steps", [("dpm++2m", 4), ("ddpm", 5), ("heun", 3)])
def test_image_depends_only_on_seed_and_index(tiny_run, sampler, steps):
    m = load_model(tiny_run)
    kw = dict(num=5, labels="all", seed=7, sampler=sampler, steps=steps, cfg_scale=2.0)
    a = generate(m, batch_size=5, **kw)
    b = generate(m, batch_size=2, **kw)
    assert np.array_equal(a["images"], b["images"])
    c = generate(m, batch_size=1, **{**kw, "num": 3})
    assert np.array_equal(a["images"][:3], c["images"])  # image i does not depend on how many were asked
    d = generate(m, batch_size=5, **{**kw, "seed": 8})
    assert not np.array_equal(a["images"], d["images"])


def test_bf16_inference_keeps_one_seed_one_image(tiny_run, tmp_path):
    """--precision bf16: the network in bf16, the sampler in fp32; the same bits at any batch size, images
    close to fp32's (not equal: bf16 rounding), and a clear error for a precision that does not exist."""
    m = load_model(tiny_run, precision="bf16")
    assert m.precision == "bf16" and next(m.net.parameters()).dtype == torch.bfloat16
    # few images and steps: bf16 matrix products are slow where the CPU has no bf16 units (AVX2: ~1 GFLOPS)
    kw = dict(num=6, labels="all", seed=3, sampler="dpm++2m", steps=3, cfg_scale=2.0)
    a = generate(m, batch_size=6, **kw)
    for bs in (1, 4):
        assert np.array_equal(generate(m, batch_size=bs, **kw)["images"], a["images"]), bs
    f = generate(load_model(tiny_run), batch_size=6, **kw)
    diff = np.abs(a["images"].astype(int) - f["images"].astype(int))
    assert diff.any() and diff.mean() < 2.0  # uint8 levels
    with pytest.raises(UsageError, match="allowed fp32, bf16"):
        load_model(tiny_run, precision="fp16")
    npz = tmp_path / "b.npz"
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(npz), "--num", "6", "--seed", "3",
                     "--steps", "3", "--cfg-scale", "2", "--precision", "bf16", "--batch-size", "4",
                     "--sampler", "dpm++2m"]) == 0
    assert np.array_equal(np.load(npz)["images"], a["images"])


def test_sample_cli_writes_png_and_npz(tiny_run, tmp_path, capsys):
    npz, png = tmp_path / "s.npz", tmp_path / "s.png"
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(npz), "--out", str(png), "--num", "6",
                     "--labels", "0,1,2", "--steps", "3"]) == 0
    z = np.load(npz)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (6, 28, 28, 1)
    assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_cli_sampler_options(tiny_run, tmp_path, capsys):
    """--sampler-option reaches the sampler (EDM's stochastic Heun differs from the deterministic one);
    an option the sampler does not take is refused with the ones it does."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    base = ["sample", "--ckpt", str(tiny_run), "--num", "4", "--steps", "4", "--sampler", "heun"]
    assert cli_main(base + ["--out", str(a)]) == 0
    assert cli_main(base + ["--out", str(b), "--sampler-option", "s_churn=10", "--sampler-option", "s_tmin=0.05"]) == 0
    assert not np.array_equal(np.load(a)["images"], np.load(b)["images"])
    assert run_cli(base + ["--out", str(a), "--sampler-option", "eta=0.5"]) == 2
    assert "allowed options: s_churn, s_tmin, s_tmax, s_noise" in capsys.readouterr().err
    assert run_cli(base + ["--out", str(a), "--sampler-option", "s_churn"]) == 2
    assert "give KEY=VALUE" in capsys.readouterr().err


def run_cli(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


@pytest.mark.parametrize("argv,needle,code", [
    (["train", "--model", "DiT-Z/9"], "invalid choice", 2),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1", 2),
    (["train", "--lr", "nan"], "--lr must be a finite number", 2),
    (["train", "--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1; or give auto", 2),
    (["train", "--batch-size", "automatic"], "--batch-size must be an integer", 2),
    (["train", "--objective", "edm"], "invalid choice", 2),
    (["train", "--bogus"], "unrecognized arguments", 2),
    (["train", "--dataset", "/nonexistent/folder", "--out", "{tmp}/r"], "mnist", 1),
    (["sample", "--ckpt", "/nonexistent/run", "--out", "x.png"], "no such folder", 1),
    (["sample", "--ckpt", "{tmp}", "--out", "x.png"], "not a ditkit run folder", 1),
    (["sample", "--ckpt", "{run}", "--out", "x.gif"], "must end in .png or .npz", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--labels", "12"], "class ids must be in 0..9", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--labels", "a,b"], "'prior' (the training mix)", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--sampler", "magic"], "invalid choice", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--steps", "0"], "--steps must be >= 1", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--cfg-scale", "-1"], "--cfg-scale must be >= 0", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--cfg-scale", "nan"], "finite", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--autoguidance", "-1"], "--autoguidance must be >= 0", 2),
    (["eval", "--ckpt", "{run}", "--cfg-schedule", "linear"], "invalid choice: 'linear'", 2),
    (["sample", "--ckpt", "{run}", "--out", "{tmp}/x.png", "--autoguidance", "2", "--guide", "/nonexistent"],
     "no such folder", 1),
    (["train", "--width", "130", "--out", "{tmp}/r"], "DiT-T/4 with --width 130: hidden_size 130 must be divisible by num_heads 4", 2),
    (["train", "--heads", "0"], "--heads must be >= 1", 2),
    (["train", "--guide-at", "1", "--out", "{tmp}/r"], "--guide-at 1.0: must be in [0, 1)", 2),
    (["train", "--logit-mean", "inf", "--out", "{tmp}/r"], "--logit-mean must be a finite number", 2),
    (["train", "--center", "median", "--out", "{tmp}/r"], "invalid choice: 'median'", 2),
    (["train", "--stable-target", "-5", "--out", "{tmp}/r"], "--stable-target must be >= 0", 2),
    (["train", "--objective", "ddpm", "--stable-target", "64", "--out", "{tmp}/r"],
     "--stable-target: for the interpolant objectives", 2),
    # refused before anything is written: a seed torch cannot take, a grid sampler the model cannot use
    (["train", "--seed", "99999999999999999999", "--out", "{tmp}/r"], "--seed must be in [0, 2**63 - 1]", 2),
    (["train", "--seed", "-1", "--out", "{tmp}/r"], "--seed must be in [0, 2**63 - 1]", 2),
    (["train", "--sample-sampler", "bogus", "--out", "{tmp}/r"], "invalid choice: 'bogus'", 2),
    (["train", "--objective", "ddpm", "--sample-sampler", "euler-maruyama", "--max-steps", "1", "--out", "{tmp}/r"],
     "--sample-sampler: needs a continuous-time objective", 2),
    (["train", "--objective", "ddpm", "--sample-steps", "1001", "--max-steps", "1", "--out", "{tmp}/r"],
     "--sample-steps: must be between 1 and 1000", 2),
    # options that left the command line: one line naming their Python home
    (["train", "--dispersive", "0.25", "--out", "{tmp}/r"], "ditkit.experimental", 2),
    (["train", "--qk-norm", "--out", "{tmp}/r"], "--qk-norm is no longer a `ditkit train` flag", 2),
    (["train", "--norm", "rmsnorm", "--out", "{tmp}/r"], "train_config(norm=...", 2),
    (["train", "--stratified-time", "--out", "{tmp}/r"], "ditkit.experimental", 2),
    (["train", "--train-guidance=1.5", "--out", "{tmp}/r"], "ditkit.experimental", 2),
    (["data", "mnist", "--idx-dir", "/nonexistent", "--cache-dir", "{tmp}/c"], "/nonexistent", 1),
])
def test_cli_bad_inputs_exit_nonzero_with_one_clear_line(argv, needle, code, tiny_run, tmp_path, capsys):
    rc = run_cli([a.format(run=tiny_run, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    assert needle in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert not (tmp_path / "c" / "mnist").exists() or not any((tmp_path / "c" / "mnist").iterdir())
    assert not (tmp_path / "r").exists()  # a refused run leaves no folder that would block the retry


@pytest.mark.parametrize("fields,needle", [
    (dict(train_guidance=0.5), "--train-guidance 0.5: must be a number >= 1"),
    (dict(objective="ddpm", train_guidance=2), "model guidance is for the interpolant objectives"),
    (dict(train_guidance=2, unconditional=True), "guidance needs class labels"),
    (dict(train_guidance=2, label_dropout=0), "give --label-dropout > 0"),
    (dict(dispersive=-0.5), "--dispersive -0.5: must be a number >= 0"),
    (dict(dispersive=0.25, dispersive_block=5), "--dispersive-block 5: the model has blocks 1 to 2"),
    (dict(mlp="relu"), "--mlp 'relu': allowed"),
    (dict(rope=True, width=120, heads=4), "rope needs a head width (hidden_size / num_heads = 30) divisible by 4"),
    (dict(seed=2 ** 64), "--seed 18446744073709551616: must be an integer in [0, 2**63 - 1]"),
    (dict(sample_sampler="bogus"), "--sample-sampler 'bogus': allowed"),
])
def test_experimental_options_are_checked_from_python(fields, needle, tmp_path):
    """The options that left the command line keep their checks in Python (ditkit.experimental), and a
    refused run writes nothing."""
    from ditkit import experimental

    small = {k: v for k, v in SMALL.items() if k not in fields}
    with pytest.raises(UsageError) as e:
        experimental.train(experimental.train_config(out=str(tmp_path / "r"), max_steps=1, **small, **fields))
    assert needle in str(e.value)
    assert not (tmp_path / "r").exists()


def test_train_help_keeps_its_main_group_short(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    main_group = out.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    flags = [ln.split()[0].rstrip(",") for ln in main_group.splitlines() if ln.startswith("  -")]
    assert 5 <= len(flags) <= 35, flags
    for gone in ("--dispersive", "--stratified-time", "--train-guidance", "--norm", "--qk-norm", "--mlp", "--rope"):
        assert gone + " " not in out and gone + "\n" not in out
    for group in ("schedule and optimiser", "logging, checkpoints and sample grids", "hardware"):
        assert group + ":" in out


def test_guide_is_the_ema_at_its_fraction_of_the_run_and_survives_resume(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "g"), max_steps=12, ckpt_every=3, guide_at=0.25, **SMALL))
    g = run / "guide"
    assert json.loads((g / "state.json").read_text())["step"] == 3
    ema3 = load_weights(run / "checkpoints" / "step_0000003", "ema")
    kept = load_weights(g, "ema")
    assert all(torch.equal(kept[k], ema3[k]) for k in ema3)
    before = (g / "model.safetensors").read_bytes()
    train(TrainConfig(out=str(run), max_steps=30, ckpt_every=0, guide_at=0.25, **SMALL), resume=True)
    assert (g / "model.safetensors").read_bytes() == before  # a resumed run keeps the guide it has
    none = train(TrainConfig(out=str(tmp_path / "n"), max_steps=4, ckpt_every=0, guide_at=0.0, **SMALL))
    assert not (none / "guide").exists()


def test_autoguidance_sampling_with_the_runs_own_or_another_weak_model(tiny_run, tiny_ddpm_run, tmp_path, capsys):
    import shutil

    m = load_model(tiny_run)
    assert m.guide is not None and m.guide.step == 12 and m.step == 40  # guide_at 0.3 of 40 steps
    kw = dict(num=5, labels="all", seed=3, steps=4, autoguidance=2.0)
    a = generate(m, batch_size=5, **kw)
    assert np.array_equal(a["images"], generate(m, batch_size=2, **kw)["images"])  # one seed, one image
    assert not np.array_equal(a["images"], generate(m, batch_size=5, **{**kw, "autoguidance": 1.0})["images"])
    both = generate(m, batch_size=5, **{**kw, "cfg_scale": 1.5})
    assert not np.array_equal(a["images"], both["images"])
    # a guidance interval: every level inside is plain autoguidance, none inside is no guidance at all
    assert np.array_equal(a["images"], generate(m, batch_size=5, guidance_interval=(0, float("inf")), **kw)["images"])
    assert np.array_equal(generate(m, batch_size=5, **{**kw, "autoguidance": 1.0})["images"],
                          generate(m, batch_size=5, guidance_interval=(1e6, 1e7), **kw)["images"])
    part = generate(m, batch_size=5, guidance_interval=(0.0, 5.0), **kw)  # not at the first level (sigma 999)
    assert not np.array_equal(a["images"], part["images"])
    for bad in ["1", "2,1", "a,b", "-1,2", "nan,1"]:
        rc = run_cli(["sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "gi.png"), "--autoguidance", "2",
                      f"--guidance-interval={bad}"])
        err = capsys.readouterr().err
        assert rc == 2 and "--guidance-interval" in err and "0.6,inf" in err and "Traceback" not in err, err
    # another weak model: an earlier checkpoint of the run
    other = load_model(tiny_run, guide=tiny_run / "checkpoints" / "step_0000020")
    assert other.guide.step == 20
    assert not np.array_equal(a["images"], generate(other, batch_size=5, **kw)["images"])
    with pytest.raises(UsageError, match="not a weak version of this model"):
        load_model(tiny_run, guide=tiny_ddpm_run)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    shutil.rmtree(bare / "guide")
    with pytest.raises(UsageError, match="no weak model to guide with"):
        generate(load_model(bare), batch_size=5, **kw)
    rc = run_cli(["sample", "--ckpt", str(bare), "--out", str(tmp_path / "x.png"), "--autoguidance", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--guide-at" in err and "Traceback" not in err
    assert run_cli(["sample", "--ckpt", str(bare), "--out", str(tmp_path / "y.png"), "--num", "2", "--steps", "2",
                    "--autoguidance", "2", "--guide", str(tiny_run / "checkpoints" / "step_0000020")]) == 0


def test_steps_above_training_steps_refused(tiny_ddpm_run, tmp_path, capsys):
    rc = cli_main(["sample", "--ckpt", str(tiny_ddpm_run), "--out", str(tmp_path / "x.png"), "--steps", "1001"])
    assert rc == 2 and "between 1 and 1000" in capsys.readouterr().err


def test_integration_loss_falls_on_real_mnist(tmp_path):
    """DiT-T/4 on 2,000 real MNIST digits: the loss falls well below its start within 60 steps (measured:
    to ~0.41 of the first logged loss over the last three logs)."""
    run = train(TrainConfig(out=str(tmp_path / "it"), model="DiT-T/4", batch_size=32, max_steps=60,
                            warmup_steps=20, log_every=10, ckpt_every=0, sample_every=0, sample_steps=1, progress=False,
                            subset=2000))
    ls = [l for _, l in losses(run)]
    assert np.mean(ls[-3:]) < 0.6 * ls[0], ls


def test_rejection_redraws_what_the_model_reads_as_another_class(tiny_run, tmp_path, capsys):
    from ditkit.evaluate import image_settings
    from ditkit.sampling import check_reject

    m = load_model(tiny_run)
    kw = dict(num=4, labels="all", seed=2, steps=3)
    plain = generate(m, batch_size=4, **kw)
    a = generate(m, batch_size=4, reject=0.05, **kw)
    assert np.array_equal(a["images"], generate(m, batch_size=3, reject=0.05, **kw)["images"])  # one seed, one image
    assert np.array_equal(a["labels"], plain["labels"])
    changed = int((a["images"] != plain["images"]).reshape(4, -1).any(1).sum())
    # an image kept at its first draw is the plain one; every changed image was redrawn at least once
    assert a["redraws"] >= changed and 0 <= a["rejected_kept"] <= changed
    # 40 steps of training hardly tell the digits apart: images are redrawn, at most 3 times each
    assert 0 < changed and a["redraws"] <= 3 * 4
    assert [t for t, _ in image_settings(dict(reject=0.05, labels_spec="prior"))] == ["reject0.05"]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match="--reject"):
            generate(m, reject=bad, **kw)
    with pytest.raises(UsageError, match="reject-tries 1"):
        generate(m, reject=0.0, reject_tries=1, **kw)

    class Unconditional:
        num_classes = 0
    with pytest.raises(UsageError, match="unconditional"):
        check_reject(Unconditional(), 0.0, 4)
    rc = cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "x.png"), "--reject", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "must be a number in [0, 1)" in err and "Traceback" not in err
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "y.png"), "--num", "3",
                     "--steps", "2", "--reject", "0"]) == 0
    assert "redrawn" in capsys.readouterr().out
