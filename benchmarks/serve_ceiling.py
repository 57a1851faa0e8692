"""How much dynamic batching can gain on this machine at most: the sampler's own throughput at batch 1
(what an unbatched server does per request) and at batch 8-64 (what a batching server does per batch),
set against the cores' measured matrix-multiply peak. No HTTP: the ceiling that any server on these cores
stays under (the serving issue's figure: batched >= 4x unbatched at 32 clients).

    python benchmarks/serve_ceiling.py --ckpt runs/exp/base [--cfg-scale 1.35] [--batches 8,16,32,64]

Peak: the best GFLOP/s of large square matrix products (fp32 and bf16) on the torch threads. Work per image:
the network's FLOPs over its guided forwards (20 steps, a conditional and an unconditional row each),
counted by benchmarks/latency.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from latency import network_gflop  # benchmarks/latency.py, beside this script


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def images_per_s(model, batch: int, rounds: int, **kw) -> float:
    from ditkit.sampling import sample_batch

    labels, seeds = [i % 10 for i in range(batch)], list(range(batch))
    sample_batch(model, labels, seeds, **kw)
    best = 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        sample_batch(model, labels, [s + 1000 * (r + 1) for s in seeds], **kw)
        best = max(best, batch / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--cfg-scale", type=float, default=1.35)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from ditkit.sampling import load_model

    kw = dict(steps=args.steps, cfg_scale=args.cfg_scale)
    res: dict = dict(threads=torch.get_num_threads(), peak_gflops={
        "fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)})
    rows, gf = [], None
    for precision in ("fp32", "bf16"):
        for compile in (False, True):
            model = load_model(args.ckpt, precision=precision, compile=compile)
            gf = gf or network_gflop(model, args.steps)  # the same network in every mode
            for b in [1] + [int(x) for x in args.batches.split(",")]:
                ips = images_per_s(model, b, max(args.rounds, 12 // b), **kw)
                rows.append(dict(precision=precision, compiled=compile, batch=b, img_per_s=round(ips, 1),
                                 gflops=round(ips * gf, 1)))
                print(json.dumps(rows[-1]), flush=True)
    res["gflop_per_image"] = round(gf, 3)
    res["rows"] = rows
    single = max(r["img_per_s"] for r in rows if r["batch"] == 1)
    best = max(rows, key=lambda r: r["img_per_s"])
    res["best_single_img_per_s"] = single
    res["best_batched"] = best
    res["batching_ceiling"] = round(best["img_per_s"] / single, 2)
    res["peak_bound_img_per_s"] = {k: round(v / gf, 1) for k, v in res["peak_gflops"].items()}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
