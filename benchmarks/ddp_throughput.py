"""Data-parallel training throughput: img/s with 1 process and with N processes (torchrun, gloo on CPU).

    python benchmarks/ddp_throughput.py [--batch-size 64] [--steps 60] [--procs 1,2] [--model DiT-T/4]

Every configuration trains the same run (`ditkit train`, same global batch, seed and data) for `--steps`
steps, logging every `--log-every` steps; the figure is the median of the logged img/s windows after the
first (which includes start-up). Configurations:

    1 process x T threads  for T in --threads-single (default: 1 and all cores)
    N processes x 1 thread  for N in --procs beyond 1 (torchrun --standalone, one free port each)

Prints a markdown table for docs/BENCHMARKS.md. Bounded: each run is a subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, procs: int, threads: int, args: argparse.Namespace) -> dict:
    train = ["-m", "ditkit", "train", "--model", args.model, "--subset", str(args.subset),
             "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--log-every", str(args.log_every),
             "--sample-every", "0", "--ckpt-every", "0", "--no-progress", "--threads", str(threads),
             "--sample-sampler", "euler", "--sample-steps", "1", "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    t0 = time.monotonic()
    p = subprocess.run(launcher + train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    wall_s = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(launcher + train)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["img_per_s"] for r in recs[1:]] or [recs[-1]["img_per_s"]]
    return {"procs": procs, "threads": threads, "img_per_s": statistics.median(windows),
            "img_per_s_min": min(windows), "img_per_s_max": max(windows), "windows": len(windows),
            "wall_s": wall_s, "final_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-T/4")
    ap.add_argument("--batch-size", type=int, default=64, help="the global batch (split across processes)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--subset", type=int, default=8192)
    ap.add_argument("--procs", default="1,2", help="process counts; 1 runs without torchrun")
    ap.add_argument("--threads-single", default=f"1,{os.cpu_count() or 1}",
                    help="thread counts for the 1-process runs")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    configs = []
    for n in (int(x) for x in args.procs.split(",")):
        if n == 1:
            configs += [(1, int(t)) for t in dict.fromkeys(args.threads_single.split(","))]
        else:
            configs.append((n, 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="ditkit-ddp-bench-") as tmp:
        for i, (procs, threads) in enumerate(configs):
            res = run(Path(tmp) / f"run{i}", procs, threads, args)
            results.append(res)
            print(f"{procs} process(es) x {threads} thread(s): {res['img_per_s']:.0f} img/s "
                  f"(windows {res['img_per_s_min']:.0f}..{res['img_per_s_max']:.0f}; wall {res['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)

    base = results[0]["img_per_s"]
    print(f"\n{args.model}, global batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPU cores, "
          "gloo; median img/s of the logged windows after the first\n")
    print("| processes | threads each | img/s | vs first row | final loss |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['procs']} | {r['threads']} | {r['img_per_s']:.0f} | {r['img_per_s'] / base:.2f}x | "
              f"{r['final_loss']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
