"""How long `DiT.compile_for_inference` takes, and the compiled forward's median time at a few batch sizes.
DiT-T/4 with random weights (the timing does not depend on them), 2 threads. Point TORCHINDUCTOR_CACHE_DIR
at an empty folder to price a first compilation.

    python benchmarks/probes/compile_inference_time.py --batches 16,4,16,4 --iters 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ditkit.condition import Condition
from ditkit.models import build_model, model_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-T/4")
    ap.add_argument("--batches", default="16,4,16,4")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = build_model(model_config(args.model)).eval().requires_grad_(False)
    t0 = time.perf_counter()
    net.compile_for_inference()
    res = {"compile_s": round(time.perf_counter() - t0, 1), "forward_ms_median": []}
    for b in (int(v) for v in args.batches.split(",")):
        x, t = torch.randn(b, 1, 28, 28), torch.rand(b)
        cond = Condition.from_labels(torch.arange(b) % 10, 10)
        times = []
        with torch.no_grad():
            for i in range(args.iters + 3):
                t1 = time.perf_counter()
                net(x, t, cond)
                if i >= 3:
                    times.append(time.perf_counter() - t1)
        res["forward_ms_median"].append([b, round(sorted(times)[len(times) // 2] * 1e3, 2)])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
