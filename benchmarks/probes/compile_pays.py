"""Does compiling the training step pay on this CPU? Two `ditkit train` runs of the default recipe, one
with --compile and one with --no-compile, the same seed and step count; prints each run's wall time, its
last logged elapsed time and its median img/s over the second half. Point TORCHINDUCTOR_CACHE_DIR at an
empty folder to price a first compilation (what a fresh machine pays).

    python benchmarks/probes/compile_pays.py --steps 400 --seed 0 --out runs/compile_pays
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(out: Path, mode: str, steps: int, seed: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ditkit", "train", "--out", str(out), "--no-progress", "--sample-every", "0",
           "--ckpt-every", "0", "--max-steps", str(steps), "--seed", str(seed), f"--{mode}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"mode": mode, "wall_s": round(wall, 1), "elapsed_s": round(rows[-1]["elapsed_s"], 1),
            "img_per_s_median_2nd_half": round(statistics.median(r["img_per_s"] for r in rows[len(rows) // 2:]), 1),
            "compiled": json.loads((out / "config.json").read_text())["compiled"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/compile_pays")
    args = ap.parse_args()
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    for mode in ("compile", "no-compile"):
        print(json.dumps(run(Path(args.out) / mode, mode, args.steps, args.seed)), flush=True)


if __name__ == "__main__":
    main()
