"""Δ-caching of the back blocks at sampling (samplers.cache): speed-up against the FID change, on a
trained run, at the default sampler and steps.

    python benchmarks/dynamic_compute.py --ckpt runs/levers_t4 [--intervals 1,2,3] [--num 1000] [--rounds 3]
    python benchmarks/dynamic_compute.py --preset DiT-S/2 --batch 8     # random weights: speed only

Speed: one batch of `--batch` (64) images per setting per round, the settings interleaved within each round (a
shared CPU's load then falls on all of them alike), the fastest round of each. Quality: `--num` images
per setting at the same seeds and labels, FID and class accuracy by ditkit's classifier.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a trained run: speed and the FID / accuracy change")
    src.add_argument("--preset", help="a preset with random weights: speed only")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--intervals", default="1,2,3")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    args = ap.parse_args()
    from ditkit.eval.metrics import evaluate_images
    from ditkit.runs import load_model
    from ditkit.sampling import generate, sample_batch
    from ditkit.settings import SamplingSettings

    if args.ckpt:
        model = load_model(args.ckpt)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from int8 import random_model

        model = random_model(args.preset)
    intervals = [int(v) for v in args.intervals.split(",")]
    settings = {k: SamplingSettings(cfg_scale=args.cfg_scale, cache_interval=k).validate(model) for k in intervals}
    best = {k: float("inf") for k in intervals}
    labels = [i % model.num_classes for i in range(args.batch)]
    for _ in range(args.rounds):
        for k in intervals:
            t0 = time.perf_counter()
            sample_batch(model, labels, list(range(args.batch)), settings[k])
            best[k] = min(best[k], time.perf_counter() - t0)
    if not args.ckpt:
        for k in intervals:
            print(json.dumps({"model": args.preset, "cache_interval": k, "batch": args.batch, "batch_s": best[k],
                              "speedup": best[intervals[0]] / best[k]}), flush=True)
        return
    rows = []
    for k in intervals:
        out = generate(model, settings[k], num=args.num, labels="all", seed=0, batch_size=100)
        ev = evaluate_images(out["images"], out["labels"])
        rows.append({"cache_interval": k, "batch_s": best[k], "speedup": best[intervals[0]] / best[k],
                     "fid": ev["fid"], "fid_ratio": ev["fid_ratio"], "accuracy": ev["class_accuracy"]["value"],
                     "num": args.num})
        rows[-1]["fid_change"] = rows[-1]["fid"] / rows[0]["fid"] - 1
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
