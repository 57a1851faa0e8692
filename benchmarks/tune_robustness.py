"""The run's own sampling setting against fixed settings, with host speed taken out: the default recipe trained
for fixed step budgets (stand-ins for slow and fast hosts), each run tuned (`ditkit tune`), then every run
evaluated at n images with its chosen setting and with each fixed candidate.

    python benchmarks/tune_robustness.py --out runs/tune_bench --steps 3000 5000 7500 10000 --num 3000

Prints one markdown table: per step budget, the chosen setting and its FID ratio / accuracy, beside each
fixed setting's; and the chosen setting's sampling time per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tune_bench")
    ap.add_argument("--steps", type=int, nargs="+", default=[3000, 5000, 7500, 10000])
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed", nargs="*", default=["cfg 1.35", "autoguidance 2 + rejection"],
                    help="the fixed candidates (ditkit.tune.CANDIDATES names) to evaluate beside the chosen one")
    args = ap.parse_args()

    from ditkit.evaluate import evaluate_model
    from ditkit.runs import load_model, write_tuned_setting
    from ditkit.settings import SamplingSettings
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train
    from ditkit.tune import CANDIDATES, tune_model

    fixed = dict(CANDIDATES)
    rows = []
    for steps in args.steps:
        run = Path(args.out) / f"steps{steps}_seed{args.seed}"
        if not (run / "checkpoints").exists():
            train(TrainConfig(out=str(run), max_steps=steps, seed=args.seed, progress=False))
        model = load_model(run)
        rec = tune_model(model, log_fn=print)
        write_tuned_setting(run, rec)
        chosen = SamplingSettings.from_dict(rec["settings"])
        row = {"steps": steps, "chosen": rec["name"], "tune_s": rec["seconds"]}
        for name, st in [("chosen", chosen)] + [(n, fixed[n]) for n in args.fixed]:
            try:
                st.validate(model)
            except Exception as e:  # e.g. autoguidance without a guide
                row[name] = {"skipped": str(e)}
                continue
            res, samples = evaluate_model(model, st, num=args.num, labels="prior", seed=args.seed)
            row[name] = {"fid_ratio": round(res["fid_ratio"], 3),
                         "accuracy": round(res["class_accuracy"]["value"], 4),
                         "ms_per_image": round(1000 * res["sample_seconds"] / args.num, 1)}
            print(json.dumps({"steps": steps, "setting": name, **row[name]}), flush=True)
        rows.append(row)
    names = ["chosen"] + list(args.fixed)
    print("\n| steps | chosen | " + " | ".join(f"{n}: FID ratio, accuracy" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        cells = []
        for n in names:
            v = r.get(n, {})
            cells.append("skipped" if "skipped" in v else f"{v['fid_ratio']:.2f}x, {100 * v['accuracy']:.2f}% "
                                                          f"({v['ms_per_image']:.0f} ms/img)")
        print(f"| {r['steps']} | {r['chosen']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
