"""What a training run's periodic sample grid costs, drawn in fp32 and in bf16.

    python benchmarks/probes/train_grid.py --ckpt runs/demo [--rounds 5]

A run draws a 10x10 grid of its EMA every `--sample-every` steps (1,000 by default) with the run's
`--sample-sampler` and `--sample-steps` (Heun, 10 steps: 19 network evaluations, guided: a batch of 200).
A time-limited run spends that time off its training steps. This times `ditkit.train.loop.save_sample_grid`
on the run's EMA weights in fp32 (what every run drew before round 32) and in bf16 (what a run that
trains in bf16 draws since), the two alternated, and prints the median seconds a grid and the share of
a 10-minute run that ~9 grids take.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ditkit.sampling import load_model
from ditkit.train.config import TrainConfig
from ditkit.train.loop import save_sample_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a run folder (its EMA weights are drawn from)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--grids", type=int, default=9, help="grids in a run, for the share of its time")
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    lm = load_model(args.ckpt)
    cfg = TrainConfig.from_dict(lm.config.get("train", {}))  # the run's own grid settings (defaults if absent)
    times = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        save_sample_grid(tmp, lm.net, lm.objective, 0, cfg, "bf16")  # warm-up, untimed
        for r in range(args.rounds):
            for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                t = time.perf_counter()
                save_sample_grid(tmp, lm.net, lm.objective, r, cfg, precision)
                times[precision].append(time.perf_counter() - t)
    print(f"grid: {cfg.sample_sampler}, {cfg.sample_steps} steps, guidance {cfg.sample_cfg_scale}; "
          f"{args.rounds} rounds alternated")
    for precision, ts in times.items():
        med = statistics.median(ts)
        share = 100 * args.grids * med / (60 * args.minutes)
        print(f"{precision}: median {med:.2f} s a grid (min {min(ts):.2f}, max {max(ts):.2f}); "
              f"{args.grids} grids = {share:.1f}% of {args.minutes:g} minutes")


if __name__ == "__main__":
    main()
