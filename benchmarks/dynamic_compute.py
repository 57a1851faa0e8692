"""Δ-caching of the back blocks at sampling (samplers.cache): speed-up against the FID change, on a
trained run, at the default sampler and steps.

    python benchmarks/dynamic_compute.py --ckpt runs/levers_t4 [--intervals 1,2,3] [--num 1000] [--rounds 3]

Speed: one batch of 64 images per setting per round, the settings interleaved within each round (a
shared CPU's load then falls on all of them alike), the fastest round of each. Quality: `--num` images
per setting at the same seeds and labels, FID and class accuracy by ditkit's classifier.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--intervals", default="1,2,3")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    args = ap.parse_args()
    from ditkit.eval.metrics import evaluate_images
    from ditkit.runs import load_model
    from ditkit.sampling import generate, sample_batch
    from ditkit.settings import SamplingSettings

    model = load_model(args.ckpt)
    intervals = [int(v) for v in args.intervals.split(",")]
    settings = {k: SamplingSettings(cfg_scale=args.cfg_scale, cache_interval=k).validate(model) for k in intervals}
    best = {k: float("inf") for k in intervals}
    labels = [i % model.num_classes for i in range(64)]
    for _ in range(args.rounds):
        for k in intervals:
            t0 = time.perf_counter()
            sample_batch(model, labels, list(range(64)), settings[k])
            best[k] = min(best[k], time.perf_counter() - t0)
    rows = []
    for k in intervals:
        out = generate(model, settings[k], num=args.num, labels="all", seed=0, batch_size=100)
        ev = evaluate_images(out["images"], out["labels"])
        rows.append({"cache_interval": k, "batch64_s": best[k], "speedup": best[intervals[0]] / best[k],
                     "fid": ev["fid"], "fid_ratio": ev["fid_ratio"], "accuracy": ev["class_accuracy"]["value"],
                     "num": args.num})
        rows[-1]["fid_change"] = rows[-1]["fid"] / rows[0]["fid"] - 1
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
