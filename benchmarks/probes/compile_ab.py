"""Eager against compiled inference (`--compile`), interleaved in one process so that both see the
same machine state: latency of one guided image at batch 1, and throughput at a larger batch.

    python benchmarks/probes/compile_ab.py --ckpt runs/recipes/r4_ag_10min [--rounds 12] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--sampler", default=None, help="default: ditkit's default sampler")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=1.35)
    ap.add_argument("--rounds", type=int, default=12, help="alternations; each times 8 single images per mode")
    ap.add_argument("--batch", type=int, default=16, help="the throughput batch (images)")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    from ditkit.sampling import DEFAULT_SAMPLER, load_model, sample_batch

    kw = dict(sampler=args.sampler or DEFAULT_SAMPLER, steps=args.steps, cfg_scale=args.cfg_scale)
    t0 = time.perf_counter()
    models = {"eager": load_model(args.ckpt, precision=args.precision),
              "compiled": load_model(args.ckpt, precision=args.precision, compile=True)}
    compile_s = time.perf_counter() - t0
    lat = {k: [] for k in models}
    thr = {k: [] for k in models}
    labels = [i % 10 for i in range(args.batch)]
    for name, m in models.items():  # warm-up (lazy initialisation, the condition memo)
        for i in range(3):
            sample_batch(m, [i], [i], **kw)
        sample_batch(m, labels, list(range(args.batch)), **kw)
    for r in range(args.rounds):
        for name, m in models.items():
            for i in range(8):
                t = time.perf_counter()
                sample_batch(m, [i % 10], [1000 + 8 * r + i], **kw)
                lat[name].append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            sample_batch(m, labels, [5000 + args.batch * r + i for i in range(args.batch)], **kw)
            thr[name].append(args.batch / (time.perf_counter() - t))
    res = {name: dict(p10_ms=float(np.percentile(lat[name], 10)), p50_ms=float(np.percentile(lat[name], 50)),
                      p90_ms=float(np.percentile(lat[name], 90)),
                      img_per_s_median=float(np.median(thr[name])), img_per_s_best=float(np.max(thr[name])))
           for name in models}
    res["setup"] = dict(load_and_compile_s=compile_s, batch=args.batch, rounds=args.rounds,
                        precision=args.precision, **kw)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
