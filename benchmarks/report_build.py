"""How long `ditkit report` takes on a DiT-T/4 run with a handful of checkpoints (target: <= 60 s on CPU).

    python benchmarks/report_build.py                  # trains a 100-step run with 5 checkpoints, then times the report
    python benchmarks/report_build.py --run runs/demo  # times the report of an existing run (written to a temp copy)

The report is timed as a user runs it: a fresh `ditkit report` process (imports included), default
settings (10 dpm++2m steps, 10 images per checkpoint, t-SNE of 500 images). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_run(out: Path, steps: int, checkpoints: int, threads: int) -> Path:
    import torch

    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    torch.set_num_threads(threads)
    cfg = TrainConfig(out=str(out), model="DiT-T/4", objective="linear", batch_size=16, max_steps=steps,
                      warmup_steps=10, log_every=5, ckpt_every=max(1, steps // checkpoints), sample_every=0,
                      progress=False, subset=2000, threads=threads)
    return train(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run folder (copied to a temp folder; the original is not touched)")
    ap.add_argument("--steps", type=int, default=100, help="training steps of the run made here")
    ap.add_argument("--checkpoints", type=int, default=5, help="checkpoints of the run made here")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of training and of the report (1: the machine is shared)")
    ap.add_argument("--repeat", type=int, default=1, help="time the report this many times; the best is reported")
    ap.add_argument("report_args", nargs=argparse.REMAINDER, help="extra flags for `ditkit report` after --")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ditkit-report-bench-") as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        if args.run:
            shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("optimizer.safetensors", "rng.safetensors"))
        else:
            train_run(run, args.steps, args.checkpoints, args.threads)
        prep_s = time.perf_counter() - t0
        from ditkit.runs import list_checkpoints

        n_ckpt = len(list_checkpoints(run))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        extra = [a for a in args.report_args if a != "--"]
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "ditkit", "report", str(run), "--device", "cpu",
                                   "--threads", str(args.threads), *extra],
                                  env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return proc.returncode
        sections = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
        print(json.dumps({"benchmark": "report_build", "model": "DiT-T/4", "checkpoints": n_ckpt,
                          "report_seconds": round(min(times), 2), "all_seconds": [round(t, 2) for t in times],
                          "sections": sections, "threads": args.threads, "prepare_seconds": round(prep_s, 1),
                          "target_seconds": 60, "ok": min(times) <= 60}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
