"""Latency of one image: 20 NFE with classifier-free guidance, batch 1, on this CPU (p50 / p90 / p99),
and where the time goes (torch.profiler by operator, and the share outside the network).

    python benchmarks/latency.py --ckpt runs/demo [--sampler dpm++2m] [--steps 20] [--cfg-scale 1.75] [--repeats 100]
                                 [--precision fp32|bf16] [--compile]
    python benchmarks/latency.py --ckpt runs/demo --compare-memo   # condition-path memo on/off, interleaved
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def network_gflop(model, steps: int) -> float:
    """GFLOP of one guided image: `steps` forwards of a batch of 2 (conditional and unconditional rows),
    the matrix products and attention of the trunk (the per-image adaLN products once per row)."""
    c = model.net.config
    n = (c.input_size // c.patch_size) ** 2
    d = c.hidden_size
    per_block = 2 * n * (3 * d * d + d * d + 2 * d * int(d * c.mlp_ratio)) + 4 * n * n * d + 2 * 6 * d * d
    return 2 * steps * (c.depth * per_block + 2 * n * d * c.patch_size ** 2 * c.in_channels * 2) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=1.75)
    ap.add_argument("--compare-memo", action="store_true",
                    help="A/B of the DiT's condition-path memo: 8 interleaved rounds of 12 images each way")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32", help="inference precision: fp32 or bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (load_model(compile=True))")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ditkit.condition import Condition
    from ditkit.sampling import load_model, sample_batch

    model = load_model(args.ckpt, precision=args.precision, compile=args.compile)
    kw = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale)
    if args.compare_memo:
        memo, res = model.net.modulation_cache, {"memo": [], "no memo": []}
        for _ in range(8):
            for name in res:
                model.net.modulation_cache = memo if name == "memo" else None
                for i in range(12):
                    t0 = time.perf_counter()
                    sample_batch(model, [i % 10], [i], **kw)
                    res[name].append(1000 * (time.perf_counter() - t0))
        model.net.modulation_cache = memo
        print(json.dumps({name: dict(p10_ms=float(np.percentile(v[12:], 10)), p50_ms=float(np.percentile(v[12:], 50)))
                          for name, v in res.items()}, indent=2))
        return
    for i in range(5):
        sample_batch(model, [i % 10], [i], **kw)
    lat = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        sample_batch(model, [i % 10], [1000 + i], **kw)
        lat.append(1000 * (time.perf_counter() - t0))
    lat = np.array(lat)
    # the network alone: the same 20 forwards of a batch of 2 (conditional + unconditional)
    net = model.net
    x, t = torch.randn(2, *model.image_shape), torch.full((2,), 500.0)
    x = x.to(next(net.parameters()).dtype)
    cond = Condition.from_labels(torch.tensor([3, model.num_classes]), model.num_classes)
    with torch.no_grad():
        for _ in range(5):
            net(x, t, cond)
        t0 = time.perf_counter()
        for _ in range(20 * 20):
            net(x, t, cond)
        net_ms = 1000 * (time.perf_counter() - t0) / 20
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample_batch(model, [3], [7], **kw)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    res = dict(p50_ms=float(np.percentile(lat, 50)), p90_ms=float(np.percentile(lat, 90)),
               p99_ms=float(np.percentile(lat, 99)), network_only_ms=net_ms, gflop=network_gflop(model, args.steps),
               threads=torch.get_num_threads(), precision=args.precision, compiled=args.compile, **kw)
    print(table)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
