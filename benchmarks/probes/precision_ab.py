"""Training steps per second, fp32 against bf16 autocast, alternated in fresh processes.

    python benchmarks/probes/precision_ab.py [--rounds 2] [--steps 400] [--batch-size 32]

Each round trains the default recipe for `--steps` steps in each precision (no lr decay, no
checkpoints or grids) and times steps 100..steps from metrics.jsonl, so start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def steps_per_s(out: Path, precision: str, steps: int, batch: int) -> float:
    subprocess.run([sys.executable, "-m", "ditkit", "train", "--out", str(out), "--max-steps", str(steps),
                    "--lr-decay", "0", "--no-progress", "--sample-every", "0", "--ckpt-every", "0",
                    "--log-every", "100", "--batch-size", str(batch), "--precision", precision],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = {r["step"]: r["elapsed_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    return (steps - 100) / (at[steps] - at[100])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    res: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for p in ("fp32", "bf16"):
                v = steps_per_s(Path(tmp) / f"{p}_{r}", p, args.steps, args.batch_size)
                res[p].append(v)
                print(f"round {r + 1} {p}: {v:.2f} steps/s", flush=True)
    print(json.dumps({p: sorted(v) for p, v in res.items()}))


if __name__ == "__main__":
    main()
