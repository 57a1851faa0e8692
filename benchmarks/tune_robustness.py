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
    ap.add_argument("--fixed", nargs="*", default=None,
                    help="the fixed candidates (ditkit.tune.CANDIDATES names) to evaluate beside the chosen one "
                         "(default: all of them)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for training and sampling")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ditkit.evaluate import evaluate_model
    from ditkit.runs import load_model, write_tuned_setting
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train
    from ditkit.tune import CANDIDATES, tune_model

    fixed = dict(CANDIDATES)
    if args.fixed is None:
        args.fixed = list(fixed)
    rows = []
    for steps in args.steps:
        run = Path(args.out) / f"steps{steps}_seed{args.seed}"
        if not (run / "checkpoints").exists():
            train(TrainConfig(out=str(run), max_steps=steps, seed=args.seed, progress=False, threads=args.threads))
        model = load_model(run)
        tuned = run / "sampling.json"
        if tuned.exists():
            rec = json.loads(tuned.read_text())
        else:
            rec = tune_model(model, log_fn=print)
            write_tuned_setting(run, rec)
        row = {"steps": steps, "chosen": rec["name"], "tune_s": rec["seconds"]}
        done_path = run / f"tune_bench_n{args.num}.json"
        done = json.loads(done_path.read_text()) if done_path.exists() else {}
        for name in dict.fromkeys([rec["name"]] + list(args.fixed)):
            st = fixed[name]
            if name not in done:
                try:
                    st.validate(model)
                except Exception as e:  # e.g. autoguidance without a guide
                    done[name] = {"skipped": str(e)}
                    continue
                res, samples = evaluate_model(model, st, num=args.num, labels="prior", seed=args.seed)
                done[name] = {"fid_ratio": round(res["fid_ratio"], 3),
                              "accuracy": round(res["class_accuracy"]["value"], 4),
                              "ms_per_image": round(1000 * res["sample_seconds"] / args.num, 1)}
                done_path.write_text(json.dumps(done, indent=1))
            print(json.dumps({"steps": steps, "setting": name, **done[name]}), flush=True)
        row["chosen_figures"] = done[rec["name"]]
        row.update(done)
        rows.append(row)
    names = list(args.fixed)
    print("\n| steps | chosen | " + " | ".join(f"{n}: FID ratio, accuracy" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        cells = []
        for n in names:
            v = r.get(n, {})
            cell = ("skipped" if "skipped" in v else f"{v['fid_ratio']:.2f}x, {100 * v['accuracy']:.2f}% "
                                                     f"({v['ms_per_image']:.0f} ms/img)")
            cells.append(f"**{cell}**" if n == r["chosen"] else cell)
        print(f"| {r['steps']} | {r['chosen']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
