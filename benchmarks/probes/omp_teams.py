"""One guided image (the default sampler, 20 NFE, CFG 1.35) timed on the main thread ("main"), on a
worker thread only ("thread-only"), or on a worker thread of a process whose main thread has also run
the model ("both": two OpenMP teams, as a server that loaded its model on one thread and sampled on
another had). Prints p50 and p10 latency and the process's CPU use in cores.

    python benchmarks/probes/omp_teams.py main|thread-only|both [--ckpt RUN]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["main", "thread-only", "both"])
    ap.add_argument("--ckpt", default="runs/recipes/r4_ag_10min")
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args()
    from ditkit.sampling import DEFAULT_SAMPLER, load_model, sample_batch

    worker = ThreadPoolExecutor(1)
    on_worker = args.mode in ("thread-only", "both")

    def run(fn, *a):
        return worker.submit(fn, *a).result() if on_worker else fn(*a)

    model = run(load_model, args.ckpt)
    kw = dict(sampler=DEFAULT_SAMPLER, steps=20, cfg_scale=1.35)

    def one(i: int) -> float:
        t = time.perf_counter()
        sample_batch(model, [i % 10], [i], **kw)
        return 1000 * (time.perf_counter() - t)

    if args.mode == "both":
        one(0)  # the main thread gets a team of its own
    for i in range(5):
        run(one, i)
    cpu0, t0 = time.process_time(), time.perf_counter()
    ms = [run(one, i) for i in range(args.images)]
    cores = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    print(f"{args.mode}: p50 {np.percentile(ms, 50):.1f} ms, p10 {np.percentile(ms, 10):.1f} ms, {cores:.2f} cores")


if __name__ == "__main__":
    main()
