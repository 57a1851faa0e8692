"""DiT against U-Net, and the tutorial's ablations: which architecture gives the best images per CPU-minute.

Every configuration is one `ditkit train` recipe (the default one: `ditkit.train.loop.train`, the function the
CLI calls) with one thing changed: the model preset (DiT-T/4, UNet-T, UNet-S, DiT-T/2, DiT-T/7) or one shape
field of DiT-T/4 (depth 8, width 192; depth 4, width 128 and patch 4 are DiT-T/4 itself).

    python benchmarks/compare.py --out OUT --configs DiT-T/4,UNet-T --minutes 5 --seeds 0,1 --eval-every 1.25
    python benchmarks/compare.py --out OUT --configs all --minutes 0        # the speed columns only

1. Speed (table D.1), on a fresh network of each configuration: parameters; one training step at batch 64
   (forward, backward, the optimiser's step: the recipe's objective, optimiser and precision, eager, the
   fastest of --train-steps after one untimed step), and from it an epoch of the training set; images/s when
   drawing a batch of 64 at 20 NFE; ms for one image at 20 NFE (the median of --latency-repeats). Drawing
   uses the untuned default setting (`SamplingSettings()`: dpm++2m-sde, 20 steps, no guidance).
2. Quality (--minutes > 0): each configuration and seed trains for --minutes of wall clock (the run's own
   clock: `--max-minutes`, at --threads), saving a checkpoint about every --eval-every minutes (its step interval planned
   from the measured step; the run's `--batch-size auto` may halve the batch, and the checkpoint nearest below
   each mark is taken). Each such checkpoint, and the last, is evaluated with `ditkit.evaluate.evaluate_model`
   (the engine of `ditkit eval`): FID as a ratio to the floor of as many real digits, and class accuracy, at
   n = --num, labels in the training data's class mix.

Writes OUT/compare.json (every figure, rewritten after each step so an interrupted run keeps what it
measured), OUT/compare.md (table D.1, then the quality of each checkpoint) and OUT/compare.png (FID ratio
and accuracy against training minutes, one colour per configuration, one line per seed). The runs stay in
--runs (default OUT/runs/); a run already there is evaluated again, not retrained. Minutes are wall-clock minutes of one process: on a shared machine, wrap the command in
`flock /tmp/ditkit-cpu.lock` so that heavy runs take turns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# name -> the `ditkit train` settings that differ from the default recipe
CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-T/4": dict(model="DiT-T/4"),  # the default: patch 4, depth 4, width 128
    "UNet-T": dict(model="UNet-T"),
    "UNet-S": dict(model="UNet-S"),
    "DiT-T/2": dict(model="DiT-T/2"),
    "DiT-T/7": dict(model="DiT-T/7"),
    "DiT-T/4 depth 8": dict(model="DiT-T/4", depth=8),
    "DiT-T/4 width 192": dict(model="DiT-T/4", width=192),
}
TIMING_BATCH = 64
COMPILE = {"auto": None, "on": True, "off": False}  # --compile: TrainConfig.compile
NFE = 20  # the untuned default: dpm++2m-sde at 20 steps, one network evaluation a step


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def parse_configs(text: str) -> list[str]:
    names = list(CONFIGS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        sys.exit(f"--configs {text!r}: unknown {unknown}; allowed: all, or a comma list of {', '.join(CONFIGS)}")
    return names


def resolved_config(name: str, data, device) -> tuple[Any, dict[str, Any]]:
    """(TrainConfig, the run's config.json as training would write it) for configuration `name`."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.resolve import resolve_run_config
    from ditkit.utils import resolve_precision

    cfg = TrainConfig(**CONFIGS[name], max_minutes=5.0)  # a length, which validate() asks for; not read here
    cfg = replace(cfg, stable_target=cfg.stable_target_refs()).validate()
    config = resolve_run_config(cfg, data)
    config["precision"] = resolve_precision(cfg.precision, device)
    return cfg, config


def train_step_ms(config: dict[str, Any], optimizer: str, device, steps: int) -> float:
    """The fastest of `steps` training steps at batch 64 after one untimed one (`train.resolve.probe_step`:
    the objective's loss on a batch spread over the classes, backward; then the optimiser's step)."""
    import torch

    from ditkit.models import build_model
    from ditkit.objectives import build_objective
    from ditkit.train.optim import build_optimizer
    from ditkit.train.resolve import probe_step

    torch.manual_seed(0)
    net = build_model(config["model"], config.get("family")).to(device).train()
    objective = build_objective(config["objective"])
    opt = build_optimizer(net, optimizer, lr=1e-3, beta2=0.99, weight_decay=0.0, device=device)
    shape, amp = tuple(config["data"]["shape"]), config["precision"] == "bf16"
    best = math.inf
    for i in range(1 + steps):
        t0 = time.perf_counter()
        probe_step(net, objective, shape, TIMING_BATCH, config["model"]["num_classes"], device, amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            best = min(best, time.perf_counter() - t0)
    return 1000 * best


def sampling_speed(config: dict[str, Any], device, repeats: int) -> tuple[float, float]:
    """(ms for one image at 20 NFE, the median of `repeats` draws through `sampling.generate`; images/s for
    a batch of 64 at 20 NFE, as 64 / (20 x the fastest of two network evaluations at batch 64): the solver's
    own arithmetic is a few elementwise operations a step, and twenty evaluations of the larger networks
    cost minutes on a loaded machine). A fresh network: the weights do not change the arithmetic."""
    import torch

    from ditkit.models import build_model
    from ditkit.objectives import build_objective
    from ditkit.runs import LoadedModel
    from ditkit.sampling import generate
    from ditkit.settings import SamplingSettings

    torch.manual_seed(0)
    net = build_model(config["model"], config.get("family")).to(device).eval().requires_grad_(False)
    model = LoadedModel(net, build_objective(config["objective"]), config)
    st = SamplingSettings()
    generate(model, st, num=1, batch_size=1)  # warm-up: first-call allocations and kernel choices
    one = []
    for r in range(repeats):
        t0 = time.perf_counter()
        res = generate(model, st, num=1, batch_size=1, seed=r)
        one.append(time.perf_counter() - t0)
    assert res["nfe"] == NFE, res["nfe"]
    from ditkit.condition import Condition

    nc = config["model"]["num_classes"]
    x = torch.randn(TIMING_BATCH, *config["data"]["shape"], device=device)
    t = torch.full((TIMING_BATCH,), 500.0, device=device)
    cond = (Condition.from_labels(torch.arange(TIMING_BATCH, device=device) % nc, nc) if nc
            else Condition.none(TIMING_BATCH))
    forward_s = math.inf
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            net(x, t, cond)
            forward_s = min(forward_s, time.perf_counter() - t0)
    return 1000 * statistics.median(one), TIMING_BATCH / (NFE * forward_s)


def measure_speed(name: str, data, device, args) -> dict[str, Any]:
    cfg, config = resolved_config(name, data, device)
    import torch

    from ditkit.models import build_model

    n_params = sum(p.numel() for p in build_model(config["model"], config.get("family")).parameters())
    step_ms = train_step_ms(config, cfg.optimizer, device, args.train_steps)
    one_ms, img_s = sampling_speed(config, device, args.latency_repeats)
    steps_per_epoch = len(data) / TIMING_BATCH
    row = dict(config=name, family=config.get("family", "dit"), params=n_params, train_ms_per_step=step_ms,
               epoch_images=len(data), train_s_per_epoch=step_ms * steps_per_epoch / 1000,
               sample_img_per_s_b64=img_s, sample_ms_one_image=one_ms, precision=config["precision"],
               optimizer=cfg.optimizer, threads=torch.get_num_threads(),
               load_avg_1min=os.getloadavg()[0])  # the host's load: on a shared machine, how contended it was
    print(f"{name:18s} {n_params / 1e6:6.2f}M params  train {step_ms:7.1f} ms/step ({row['train_s_per_epoch']:.0f} s "
          f"an epoch of {len(data)})  sample {img_s:6.1f} img/s at batch 64, {one_ms:6.1f} ms one image", flush=True)
    return row


def train_and_evaluate(name: str, seed: int, step_ms: float, args, out: Path) -> list[dict[str, Any]]:
    """Train `name` for args.minutes with seed `seed`, then evaluate the checkpoints nearest below each
    --eval-every mark and the last one; returns one row per evaluated checkpoint."""
    from ditkit.evaluate import evaluate_model
    from ditkit.runs import list_checkpoints, load_model, read_state
    from ditkit.settings import SamplingSettings
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    run_dir = Path(args.runs or out / "runs") / f"{slug(name)}-s{seed}"
    every_s = args.eval_every * 60
    if not (run_dir / "config.json").exists():
        # planned from batch 64's step (--batch-size auto may halve the batch: then it saves twice as often)
        batch_step_s = step_ms / 1000 * (args.batch_size or TIMING_BATCH) / TIMING_BATCH
        ckpt_every = max(1, int(every_s / batch_step_s))
        # no sample grids along the way, and a one-step grid at the end: a grid is not measured here, and the
        # default one (heun, 10 steps, guided: 38 NFE for 100 images) costs minutes of a slow network's run
        cfg = TrainConfig(out=str(run_dir), **CONFIGS[name], seed=seed, max_minutes=args.minutes,
                          batch_size=args.batch_size, compile=COMPILE[args.compile], threads=args.threads,
                          ckpt_every=ckpt_every,
                          sample_every=0, sample_steps=1, keep_checkpoints=0, progress=False)
        t0 = time.perf_counter()
        train(cfg)
        print(f"{name} seed {seed}: trained in {time.perf_counter() - t0:.0f} s -> {run_dir}", flush=True)
    ckpts = [(float(read_state(c).get("elapsed_s", 0.0)), int(read_state(c)["step"]), c) for c in list_checkpoints(run_dir)]
    if not ckpts:
        sys.exit(f"{run_dir}: the run saved no checkpoint")
    marks = [k * every_s for k in range(1, int(args.minutes * 60 / every_s + 1e-9) + 1)]
    chosen = {max((c for c in ckpts if c[0] <= m + 1e-6), default=ckpts[0], key=lambda c: c[0]) for m in marks}
    chosen.add(ckpts[-1])
    rows = []
    for elapsed_s, step, ck in sorted(chosen, key=lambda c: c[0]):
        model = load_model(ck)
        t0 = time.perf_counter()
        res, _ = evaluate_model(model, SamplingSettings(), num=args.num, seed=0, batch_size=250)
        acc = res.get("class_accuracy") or {}
        rows.append(dict(config=name, seed=seed, step=step, minutes=elapsed_s / 60, n=res["n"],
                         fid=res["fid"]["value"], fid_floor=res["fid_floor"], fid_ratio=res["fid_ratio"],
                         accuracy=acc.get("value"), batch=model.config["train"]["batch_size"],
                         eval_s=time.perf_counter() - t0, checkpoint=str(ck), load_avg_1min=os.getloadavg()[0]))
        print(f"  {name} seed {seed} step {step:6d} at {elapsed_s / 60:5.2f} min: FID ratio {res['fid_ratio']:.2f}x, "
              f"accuracy {100 * (acc.get('value') or float('nan')):.2f}% (n = {res['n']}, "
              f"{rows[-1]['eval_s']:.0f} s to evaluate)", flush=True)
    return rows


def at_minutes(rows: list[dict[str, Any]], minutes: float) -> dict[str, Any] | None:
    """The evaluated checkpoint latest at or before `minutes` (within 3%: a run stops a step past its mark)."""
    before = [r for r in rows if r["minutes"] <= minutes * 1.03]
    return max(before, key=lambda r: r["minutes"]) if before else None


def write_markdown(results: dict[str, Any], path: Path) -> None:
    speed = results["speed"]
    quality = results["quality"]
    marks = results["table_minutes"]
    lines = ["| configuration | parameters | train ms/step, batch 64 | s/epoch "
             f"({speed[0]['epoch_images']:,} images) | img/s drawing 64 at 20 NFE | ms for one image at 20 NFE |"
             + "".join(f" FID ratio, accuracy at {m:g} min |" for m in marks),
             "|---|---:|---:|---:|---:|---:|" + "---|" * len(marks)] if speed else []
    for s in speed:
        cells = []
        for m in marks:
            if m > results["minutes"] * 1.03:  # the runs stopped before this mark
                cells.append("not measured")
                continue
            by_seed = [r for r in (at_minutes([q for q in quality if q["config"] == s["config"] and q["seed"] == seed], m)
                                   for seed in sorted({q["seed"] for q in quality if q["config"] == s["config"]}))
                       if r is not None]
            cells.append(" / ".join(f"{r['fid_ratio']:.2f}×, {100 * r['accuracy']:.1f}%" for r in by_seed)
                         if by_seed else "not measured")
        lines.append(f"| {s['config']} | {s['params'] / 1e6:.2f} M | {s['train_ms_per_step']:.0f} | "
                     f"{s['train_s_per_epoch']:.0f} | {s['sample_img_per_s_b64']:.1f} | {s['sample_ms_one_image']:.0f} |"
                     + "".join(f" {c} |" for c in cells))
    if quality:
        lines += ["", "| configuration | seed | batch | step | minutes | FID ratio | accuracy | n |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for q in sorted(quality, key=lambda q: (q["config"], q["seed"], q["minutes"])):
            lines.append(f"| {q['config']} | {q['seed']} | {q['batch']} | {q['step']} | {q['minutes']:.2f} | "
                         f"{q['fid_ratio']:.2f}× | {100 * q['accuracy']:.2f}% | {q['n']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(quality: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(q["config"] for q in quality))
    for i, name in enumerate(names):
        colour = f"C{i}"
        for j, seed in enumerate(sorted({q["seed"] for q in quality if q["config"] == name})):
            rows = sorted((q for q in quality if q["config"] == name and q["seed"] == seed), key=lambda q: q["minutes"])
            x = [r["minutes"] for r in rows]
            label = name if j == 0 else None
            a1.plot(x, [r["fid_ratio"] for r in rows], "o-", color=colour, label=label, alpha=1 if j == 0 else 0.6)
            a2.plot(x, [100 * r["accuracy"] for r in rows], "o-", color=colour, label=label, alpha=1 if j == 0 else 0.6)
    n = quality[0]["n"] if quality else 0
    a1.set(xlabel="training minutes (wall clock)", ylabel=f"FID / floor (n = {n})", yscale="log",
           title="FID ratio to the real-digit floor (lower is better)")
    a2.set(xlabel="training minutes (wall clock)", ylabel="class accuracy (%)",
           title="class accuracy (one line per seed)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for compare.json / .md / .png and the runs")
    ap.add_argument("--runs", default=None, help="folder for the training runs (default: OUT/runs)")
    ap.add_argument("--configs", default="DiT-T/4,UNet-T", help=f"'all' or a comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--quality-configs", default=None,
                    help="the configurations to train (default: all of --configs); the rest get speed columns only")
    ap.add_argument("--minutes", type=float, default=5.0, help="training minutes per run (0: speed columns only)")
    ap.add_argument("--seeds", default="0", help="comma list of seeds, each trained for --minutes")
    ap.add_argument("--seeds-for", default=None,
                    help="the configurations that get every seed of --seeds (default: all); the rest train the first")
    ap.add_argument("--eval-every", type=float, default=1.25, help="minutes between evaluated checkpoints")
    ap.add_argument("--table-minutes", default="5,10,30", help="the minutes at which the table reads the curves")
    ap.add_argument("--num", type=int, default=1000, help="images per FID / accuracy evaluation")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="training batch (default: the recipe's auto; giving what auto would pick saves its "
                         "measurement, which counts against --minutes)")
    ap.add_argument("--compile", choices=list(COMPILE), default="auto",
                    help="compile the training step (auto: the recipe's choice, for runs of 3 minutes or more)")
    ap.add_argument("--train-steps", type=int, default=1, help="timed training steps per configuration (after 1 untimed)")
    ap.add_argument("--latency-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of every measurement and run (1 on a machine busier than its cores: two "
                         "threads then wait on each other at every operation)")
    args = ap.parse_args()
    names = parse_configs(args.configs)
    trained = names if args.quality_configs is None else parse_configs(args.quality_configs)
    seeds = [int(s) for s in args.seeds.split(",")]
    all_seeds_for = set(trained if args.seeds_for is None else parse_configs(args.seeds_for))
    if args.minutes < 0 or args.eval_every <= 0 or args.num < 1:
        sys.exit("--minutes must be >= 0, --eval-every > 0 and --num >= 1")

    import torch

    from ditkit.data import load_dataset
    from ditkit.utils import pick_device

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(threads=args.threads, minutes=args.minutes, num=args.num, eval_every=args.eval_every,
                                   batch_size=args.batch_size, compile=args.compile, command=" ".join(sys.argv),
                                   table_minutes=[float(m) for m in args.table_minutes.split(",")],
                                   cpu=_cpu_name(), speed=[], quality=[], date=time.strftime("%Y-%m-%d"))

    def save() -> None:
        (out / "compare.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, out / "compare.md")
        if results["quality"]:
            plot(results["quality"], out / "compare.png")

    device = pick_device("cpu")
    data = load_dataset("mnist")
    for name in names:
        results["speed"].append(measure_speed(name, data, device, args))
        save()
    if args.minutes > 0:
        step_ms = {s["config"]: s["train_ms_per_step"] for s in results["speed"]}
        for seed_i, seed in enumerate(seeds):  # the first seed of every configuration before any second one
            for name in trained:
                if seed_i > 0 and name not in all_seeds_for:
                    continue
                results["quality"] += train_and_evaluate(name, seed, step_ms[name], args, out)
                save()
    save()
    print(f"wrote {out / 'compare.md'}" + (f", {out / 'compare.png'}" if results["quality"] else ""))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
