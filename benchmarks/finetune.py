"""Fine-tuning a trained MNIST DiT on letters it never saw, and the diffusers round trip.

    flock /tmp/ditkit-cpu.lock .venv/bin/python benchmarks/finetune.py --base runs/ft_base --minutes 2

1. The custom set: letters A-J rendered from matplotlib's fonts (ditkit.data.glyphs), 40 per letter.
2. A judge: ditkit's MNIST classifier architecture with 11 outputs, trained on 3,000 other glyphs (another seed)
   and 3,000 MNIST digits as an 11th class "not a letter" (so a digit drawn for a letter counts as a miss).
3. Fine-tunes of the base for the same CPU budget each: full, the first 2 blocks frozen, LoRA (rank 8), and a
   fresh DiT-T/4 trained on the letters alone with `ditkit train`'s defaults, for contrast. For each: the
   trainable parameters, steps, step time, and the share of samples the judge reads as the asked letter.
4. The round trip: a short fine-tune with diffusers' timestep frequencies, exported with `ditkit export
   --format diffusers`, imported with `ditkit import`, both sampled with the same seeds.

Prints a markdown table and writes the figures as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditkit.data.glyphs import make_glyphs  # noqa: E402
from ditkit.eval.classifier import MnistClassifier, _random_shift  # noqa: E402
from ditkit.finetune import finetune, lora_section  # noqa: E402
from ditkit.runs import latest_checkpoint, load_model, read_run_config, read_state  # noqa: E402
from ditkit.sampling import generate  # noqa: E402
from ditkit.train.config import TrainConfig  # noqa: E402
from ditkit.train.loop import train  # noqa: E402

LETTERS = "ABCDEFGHIJ"
NOT_A_LETTER = len(LETTERS)  # the judge's 11th class


def folder_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from ditkit.finetune import read_folder

    f = read_folder(root, 28, 1)
    return f.images[:, 0], f.labels


def train_judge(work: Path, per_class: int = 300, seed: int = 0) -> tuple[MnistClassifier, dict]:
    """11-way classifier: letters A-J (glyphs of other seeds than the fine-tuning set) and MNIST digits."""
    from ditkit.data.mnist import load_mnist

    for name, n, s in (("judge_train", per_class, 1001), ("judge_test", 50, 1002)):
        if not (work / name).exists():
            make_glyphs(work / name, per_class=n, seed=s)
    xl, yl = folder_arrays(work / "judge_train")
    xd, _ = load_mnist("train")
    xd = xd[:len(xl)]
    x = torch.from_numpy(np.concatenate([xl, xd])).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.concatenate([yl, np.full(len(xd), NOT_A_LETTER)]))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MnistClassifier()
    model.head = nn.Linear(model.head.in_features, len(LETTERS) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    model.train()
    for _ in range(4):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(_random_shift(x[idx], 2, g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = folder_arrays(work / "judge_test")
    xdt, _ = load_mnist("test")
    acc_letters = float((judge(model, xt) == yt).mean())
    acc_digits = float((judge(model, xdt[:1000]) == NOT_A_LETTER).mean())
    return model, {"held_out_letters": acc_letters, "mnist_digits_as_not_a_letter": acc_digits}


@torch.no_grad()
def judge(model: MnistClassifier, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).unsqueeze(1)
    return torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()


def trainable_params(run: Path) -> int:
    """The fine-tune's trainable parameters, as its `prepare` leaves them (fresh run: every parameter)."""
    from ditkit.finetune import load_base, plan_start
    from ditkit.models import build_model

    cfg = read_run_config(run)
    net = build_model(cfg["model"], "dit")
    ft = cfg.get("finetune")
    if ft is None:
        return sum(p.numel() for p in net.parameters())
    start = plan_start(load_base(ft["base_checkpoint"], ft["weights"]), ft["dataset"],
                       freeze_blocks=ft["freeze_blocks"], lora=cfg.get("lora"))
    start.prepare(net)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def score(run: Path, model_judge: MnistClassifier, per_letter: int, cfg_scale: float) -> float:
    """Share of samples drawn for each letter that the judge reads as that letter."""
    model = load_model(run, device="cpu")
    names = model.class_names
    ids = [names.index(c) for c in LETTERS]
    labels = [i for i in ids for _ in range(per_letter)]
    out = generate(model, num=len(labels), labels=labels, seed=0, cfg_scale=cfg_scale)
    read = judge(model_judge, out["images"][..., 0])
    asked = np.array([LETTERS.index(names[i]) for i in labels])
    return float((read == asked).mean())


def run_facts(run: Path) -> dict:
    """Steps, the training step's time (median over the logged windows: img/s at the run's batch) and the
    trainable parameters."""
    st = read_state(latest_checkpoint(run))
    batch = read_run_config(run)["train"]["batch_size"]
    rates = [json.loads(line)["img_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = rates[1:] or rates  # the first window holds the warm-up; a short run may have no other
    return {"steps": int(st["step"]), "seconds": st.get("elapsed_s"), "batch": batch,
            "step_ms": 1000 * batch / float(np.median(rates)) if rates else None, "trainable": trainable_params(run)}


def round_trip(base: Path, glyphs: Path, work: Path, quiet: dict) -> dict:
    from ditkit.interop.diffusers import export_diffusers, import_diffusers

    run = finetune(base, glyphs, work / "rt_full", time_freq_shift=1, **quiet)
    exp = export_diffusers(run, work / "rt_diffusers")
    imp = import_diffusers(work / "rt_diffusers", work / "rt_import")
    a, b = load_model(run, device="cpu"), load_model(work / "rt_import", device="cpu")
    labels = [a.class_names.index(c) for c in LETTERS for _ in range(2)]
    ia = generate(a, num=len(labels), labels=labels, seed=7, cfg_scale=1.5)["images"]
    ib = generate(b, num=len(labels), labels=labels, seed=7, cfg_scale=1.5)["images"]
    return {"export_max_abs_diff": exp["max_abs_diff"], "import_max_abs_diff": imp["max_abs_diff"],
            "images": len(ia), "identical": bool(np.array_equal(ia, ib)),
            "max_pixel_diff": int(np.abs(ia.astype(int) - ib.astype(int)).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/ft_base", help="the trained MNIST run to fine-tune")
    ap.add_argument("--minutes", type=float, default=2.0, help="CPU budget of each fine-tune (and of the scratch run)")
    ap.add_argument("--work", default="runs/ft_bench", help="folder for the set, the runs and the exports")
    ap.add_argument("--per-letter", type=int, default=20, help="samples drawn for each letter")
    ap.add_argument("--round-trip-minutes", type=float, default=0.5)
    ap.add_argument("--judge-per-class", type=int, default=300, help="glyphs per letter the judge trains on")
    ap.add_argument("--grid-steps", type=int, default=2, help="sampler steps of each run's end-of-run grid "
                                                               "(not measured here: kept cheap)")
    ap.add_argument("--json", default="docs/bench/finetune.json")
    ap.add_argument("--only", default=None, help="comma list of run indexes to run (0 full, 1 frozen, 2 LoRA, 3 scratch; "
                                                 "default all) and no round trip")
    ap.add_argument("--freeze-lr", type=float, default=None, help="lr of the frozen-blocks fine-tune (default: its own)")
    args = ap.parse_args()
    work, base = Path(args.work), Path(args.base)
    work.mkdir(parents=True, exist_ok=True)
    glyphs = work / "glyphs"
    if not glyphs.exists():
        make_glyphs(glyphs, per_class=40, seed=0)
    t0 = time.time()
    model_judge, judge_acc = train_judge(work, args.judge_per_class)
    print(f"judge: {judge_acc} ({time.time() - t0:.0f} s)", flush=True)
    quiet = dict(progress=False, sample_every=0, ckpt_every=0, sample_steps=args.grid_steps, max_minutes=args.minutes)
    runs = {
        "full": lambda out: finetune(base, glyphs, out, **quiet),
        "freeze 2 blocks": lambda out: finetune(base, glyphs, out, freeze_blocks=2, **quiet,
                                                **({"lr": args.freeze_lr} if args.freeze_lr else {})),
        "LoRA r8 (qkv, proj, fc1, fc2, adaLN)": lambda out: finetune(
            base, glyphs, out, lora=lora_section(8, 16.0, ("qkv", "proj", "fc1", "fc2", "adaln")), **quiet),
        "from scratch (ditkit train defaults)": lambda out: train(TrainConfig(
            out=str(out), dataset=str(glyphs), image_size=28, channels=1, progress=False, sample_every=0,
            ckpt_every=0, sample_steps=args.grid_steps, max_minutes=args.minutes)),
    }
    results = {}
    only = None if args.only is None else {int(k) for k in args.only.split(",")}
    for i, (name, go) in enumerate(runs.items()):
        if only is not None and i not in only:
            continue
        out = work / (f"run{i}" if i != 1 or not args.freeze_lr else f"run{i}_lr{args.freeze_lr:g}")
        try:
            if not (out / "config.json").exists():
                go(out)
            facts = run_facts(out)
            facts.update({f"read_as_asked_cfg{s:g}": score(out, model_judge, args.per_letter, s) for s in (1.0, 2.0)})
        except Exception as e:  # one failed run is reported, the others still measured
            facts = {"error": f"{type(e).__name__}: {e}"}
        results[name] = facts
        print(name, facts, flush=True)
    rt = None if only is not None else round_trip(base, glyphs, work, {**quiet, "max_minutes": args.round_trip_minutes})
    print("round trip", rt, flush=True)
    print("\n| run | trainable params | steps | ms/step | read as asked (cfg 1) | (cfg 2) |\n|---|---|---|---|---|---|")
    for name, f in results.items():
        if "error" in f:
            print(f"| {name} | failed: {f['error']} |")
            continue
        print(f"| {name} | {f['trainable']:,} | {f['steps']:,} | {f['step_ms'] or float('nan'):.0f} | "
              f"{100 * f['read_as_asked_cfg1']:.1f}% | {100 * f['read_as_asked_cfg2']:.1f}% |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"minutes": args.minutes, "judge": judge_acc, "runs": results,
                                           "round_trip": rt, "host_threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
