"""Quality against training CPU-minutes: the checkpoints of one or more runs nearest to given minute
marks, each measured like benchmarks/probes/recipes.py (a balanced set of labels, fixed seeds, EMA weights).

    ditkit train --out runs/qvm/linear --max-minutes 30 --ckpt-every 1800 --sample-every 0
    python benchmarks/probes/quality_vs_minutes.py --runs runs/qvm/linear runs/qvm/ddpm --minutes 5,10,20,30 \\
        --scales 1.75 --out docs/bench/quality_vs_minutes.json --plot docs/bench/quality_vs_minutes.png

A checkpoint's minute mark is the training time (metrics.jsonl `elapsed_s`) at its step. Note that
the checkpoints of one long run are not the same as separate shorter runs: the learning rate decays
only over the end of the long run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def checkpoint_minutes(run: Path) -> list[tuple[float, int, Path]]:
    elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    out = []
    for ck in sorted((run / "checkpoints").glob("step_*")):
        step = int(ck.name.split("_")[1])
        near = min(elapsed, key=lambda s: abs(s - step))
        out.append((elapsed[near] / 60.0, step, ck))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=[])
    ap.add_argument("--replot", help="draw --plot from this earlier --out JSON instead of measuring")
    ap.add_argument("--minutes", default="5,10,20,30")
    ap.add_argument("--scales", default="1.75", help="CFG scales (empty: none)")
    ap.add_argument("--ag-scales", default="", help="autoguidance scales, without CFG (empty: none)")
    ap.add_argument("--guide-frac", type=float, default=0.3,
                    help="autoguidance: the weak model of a checkpoint at step S is the run's checkpoint nearest "
                         "to this fraction of S (as `ditkit train --guide-at` keeps for a run of S steps)")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--labels", default="prior", help="'prior' (the training mix, as `ditkit eval`) or 'all' (balanced)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    from ditkit.evaluate import evaluate_model
    from ditkit.sampling import load_model

    rows = json.loads(Path(args.replot).read_text()) if args.replot else []
    for run in map(Path, [] if args.replot else args.runs):
        cks = checkpoint_minutes(run)
        objective = json.loads((run / "config.json").read_text())["objective"]["name"]
        for mark in (float(m) for m in args.minutes.split(",")):
            minutes, step, ck = min(cks, key=lambda c: abs(c[0] - mark))
            if abs(minutes - mark) > 0.25 * mark:
                print(f"{run.name}: no checkpoint near {mark:g} min (nearest {minutes:.1f}); skipped", flush=True)
                continue
            ag = [float(v) for v in args.ag_scales.split(",") if v.strip()]
            guide = None
            if ag:
                earlier = [c for c in cks if c[1] < step]
                if not earlier:
                    print(f"{run.name}: no checkpoint before step {step} to guide with; autoguidance skipped")
                    ag = []
                else:
                    guide = min(earlier, key=lambda c: abs(c[1] - args.guide_frac * step))[2]
            model = load_model(ck, guide=guide)
            settings = [(float(v), 1.0) for v in args.scales.split(",") if v.strip()] + [(1.0, w) for w in ag]
            for s, w in settings:
                ev, _ = evaluate_model(model, num=args.num, labels=args.labels, seed=0, sampler=args.sampler,
                                       steps=args.steps, cfg_scale=s, autoguidance=w)
                row = dict(run=run.name, objective=objective, mark_min=mark, minutes=round(minutes, 2), step=step,
                           scale=s, autoguidance=w, guide_step=ev.get("guide_step"),
                           accuracy=ev["class_accuracy"]["value"], fid=ev["fid"]["value"], fid_ci=ev["fid_ci"],
                           floor=ev["fid_floor"], ratio=ev["fid_ratio"])
                rows.append(row)
                print(f"{run.name:>12} {minutes:5.1f} min step {step:>6} cfg {s:<5g} ag {w:<5g} acc {row['accuracy']:.4f} "
                      f"FID {row['fid']:.2f} floor {row['floor']:.2f} ratio {row['ratio']:.2f}", flush=True)
    if args.out and not args.replot:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from ditkit.viz.plots import save_figure

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in dict.fromkeys(r["run"] for r in rows):
            for s, w in dict.fromkeys((r["scale"], r.get("autoguidance", 1.0)) for r in rows):
                pts = [(r["minutes"], r["ratio"]) for r in rows
                       if r["run"] == name and r["scale"] == s and r.get("autoguidance", 1.0) == w]
                if pts:
                    what = f"autoguidance {w:g}" if w != 1 else f"guidance {s:g}"
                    ax.plot(*zip(*pts), marker="o", label=f"{name}, {what}")
        ax.set_xlabel("training CPU-minutes")
        ax.set_ylabel("FID / real-data floor")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
