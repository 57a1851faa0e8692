"""What `--batch-size auto` measures on this machine: a training step's time at each of AUTO_BATCHES (the
same measurement `ditkit train` makes), the steps each buys in a time budget, and the batch auto takes.
Repeats the measurement to show how much it varies (a host's speed drifts by the hour).

    python benchmarks/probes/auto_batch.py --minutes 10 --repeats 3

The quality side (which batch is better at a given number of steps) is measured with `ditkit train` and
`ditkit eval`: docs/BENCHMARKS.md, round 29.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ditkit.data import load_dataset
from ditkit.objectives import build_objective
from ditkit.train import loop
from ditkit.train.config import TrainConfig
from ditkit.utils import pick_device, resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = TrainConfig(max_minutes=args.minutes)
    data = load_dataset(cfg.dataset)
    config = loop.resolve_run_config(cfg, data)
    device = pick_device(cfg.device)
    config["precision"] = resolve_precision(cfg.precision, device)
    objective = build_objective(config["objective"])
    shape, amp = tuple(config["data"]["shape"]), config["precision"] == "bf16"
    print(f"# {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"precision {config['precision']}, budget {args.minutes:g} min, wanted >= {loop.AUTO_BATCH_MIN_STEPS} steps")
    for r in range(args.repeats):
        row = {}
        for batch in loop.AUTO_BATCHES:
            s = loop.seconds_per_step(config["model"], objective, shape, batch, device, amp,
                                      optimizer=cfg.optimizer)
            row[batch] = dict(step_ms=round(1000 * s, 1), img_per_s=round(batch / s), steps=int(args.minutes * 60 / s))
        t0 = time.perf_counter()
        chosen = loop.auto_batch_size(cfg, config, device, 1, len(data))
        print(json.dumps(dict(repeat=r, per_batch=row, auto=chosen, auto_measured_s=round(time.perf_counter() - t0, 2))))


if __name__ == "__main__":
    main()
