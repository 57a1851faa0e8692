"""Quality per CPU-minute: train one recipe for a budget, then measure its guided samples.

    python benchmarks/probes/recipes.py --name probe --max-steps 5000 -- --objective linear --batch-size 32
    python benchmarks/probes/recipes.py --name demo --max-minutes 10 --scales 1.5,2,3
    python benchmarks/probes/recipes.py --name demo --eval-only --scales "" --ag-scales 1.75,2,2.25
    python benchmarks/probes/recipes.py --name ag10 --max-minutes 10 --scales "" --ag-scales 2 --reject 0.08 \
        --num 3000 --seeds 0,1

Everything after `--` goes to `ditkit train` unchanged. The EMA weights of the final checkpoint draw
`--num` images (labels in the training mix unless `--labels all`, fixed seeds) at each guidance scale
with `--sampler/--steps`, for each sampling seed in `--seeds`, with `--reject M` redrawing the images the
model itself reads as another class (`ditkit eval --reject`);
the project's classifier gives the class accuracy and FID on its features, next to the FID that the
same number of real training digits gets (the floor). One JSON line per (recipe, scale, seed) is appended to
`docs/bench/recipes.jsonl`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate_run(run: Path, *, scales: list[float], sampler: str, steps: int, num: int, seeds: tuple[int, ...] = (0,),
                 labels: str = "prior", ag_scales: tuple[float, ...] = (), guide: str | None = None,
                 reject: float | None = None) -> list[dict]:
    """Guided samples at each CFG scale in `scales`, then at each autoguidance scale in `ag_scales`
    (without CFG), each with every sampling seed in `seeds` and the same labels."""
    from ditkit.evaluate import evaluate_model
    from ditkit.sampling import load_model
    from ditkit.viz.grids import save_grid

    model = load_model(run, guide=guide)
    out = []
    settings = [(s, 1.0) for s in scales] + [(1.0, w) for w in ag_scales]
    for (s, w), seed in itertools.product(settings, seeds):
        ev, res = evaluate_model(model, num=num, labels=labels, seed=seed, sampler=sampler, steps=steps,
                                 cfg_scale=s, autoguidance=w, reject=reject)
        if seed == seeds[0]:
            save_grid(res["images"][:100], run / (f"eval_grid_ag{w}.png" if w != 1 else f"eval_grid_cfg{s}.png"),
                      nrow=10)
        out.append(dict(scale=s, autoguidance=w, guide_step=ev.get("guide_step"),
                        sampler=sampler, steps=steps, nfe=ev["nfe"], num=num, seed=seed, labels=labels,
                        reject=reject, redraws=ev.get("redraws"),
                        accuracy=ev["class_accuracy"]["value"], fid=ev["fid"]["value"], fid_ci=ev["fid_ci"],
                        floor=ev["fid_floor"], ratio=ev["fid_ratio"], ratio_same_mix=ev.get("fid_ratio_same_mix"),
                        sample_s=ev["sample_seconds"]))
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "recipes"))
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--scales", default="1.5,2,3", help="CFG scales (empty: none)")
    ap.add_argument("--ag-scales", default="", help="autoguidance scales, without CFG (empty: none)")
    ap.add_argument("--guide", help="the weak model for autoguidance (default: the run's RUN/guide)")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seeds", default="0", help="sampling seeds, one evaluation each (e.g. 0,1)")
    ap.add_argument("--reject", type=float, help="redraw margin, as `ditkit eval --reject` (default: off)")
    ap.add_argument("--labels", default="prior", help="'prior' (the training mix, as `ditkit eval`) or 'all' (balanced)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "recipes.jsonl"))
    args = ap.parse_args(argv)
    run = Path(args.runs) / args.name
    train_s = None
    if not args.eval_only:
        cmd = [sys.executable, "-m", "ditkit", "train", "--out", str(run), "--no-progress", "--sample-every", "0",
               "--ckpt-every", "0", "--log-every", "50"]
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        if args.max_minutes:
            cmd += ["--max-minutes", str(args.max_minutes)]
        cmd += extra
        print("$", shlex.join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        train_s = time.time() - t0
    cfg = json.loads((run / "config.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    floats = lambda text: [float(v) for v in text.split(",") if v.strip()]  # noqa: E731
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    rows = evaluate_run(run, scales=floats(args.scales), sampler=args.sampler, steps=args.steps, num=args.num,
                        seeds=tuple(ints(args.seeds)), labels=args.labels,
                        ag_scales=tuple(floats(args.ag_scales)), guide=args.guide, reject=args.reject)
    with open(args.out, "a") as f:
        for r in rows:
            rec = dict(name=args.name, train_args=" ".join(extra), steps_trained=last["step"],
                       train_elapsed_s=last["elapsed_s"], wall_s=train_s, batch_size=cfg["train"]["batch_size"],
                       objective=cfg["objective"]["name"], **r)
            f.write(json.dumps(rec) + "\n")
            print(f"{args.name:>18} steps={last['step']:>6} cfg={r['scale']:<4} ag={r['autoguidance']:<4} "
                  f"seed={r['seed']} acc={r['accuracy']:.4f} "
                  f"fid={r['fid']:.3f} floor={r['floor']:.3f} ratio={r['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
