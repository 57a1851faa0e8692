"""Attention at DiT-T/4's shape on the CPU: PyTorch's SDPA against attention written out, in fp32 and bf16.

    python benchmarks/probes/attention_cpu.py [--batches 2,32,64,128] [--rounds 80]

One attention call of DiT-T/4 (4 heads of 32 channels, 49 tokens), forward alone (inference) and forward
plus backward (training), median milliseconds a call:
- sdpa fp32: `F.scaled_dot_product_attention` in fp32 (ditkit's attention in fp32, and in bf16 before
  round 31, which cast q, k, v up to fp32 for it);
- sdpa bf16: the same kernel in bf16 (its CPU backward is several times slower than fp32's);
- written bf16: the two products in bf16 and the softmax in fp32 (`ditkit.models.layers.bf16_attention_cpu`,
  what `Attention` runs in bf16 on the CPU since round 31), eager and through `torch.compile`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ditkit.models.layers import bf16_attention_cpu

HEADS, TOKENS, HEAD_DIM = 4, 49, 32


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def written(q, k, v):
    return bf16_attention_cpu(q, k, v, HEAD_DIM ** -0.5)


def median_ms(fn, batch: int, dtype: torch.dtype, train: bool, rounds: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype).requires_grad_(train)
               for _ in range(3))
    grad = torch.randn(batch, HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype)
    times = []
    for i in range(rounds + 5):  # 5 untimed (warm-up, compilation)
        t = time.perf_counter()
        if train:
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,32,64,128")
    ap.add_argument("--rounds", type=int, default=80)
    args = ap.parse_args()
    compiled = torch.compile(written, dynamic=False)
    rows = [("sdpa fp32", sdpa, torch.float32), ("sdpa bf16", sdpa, torch.bfloat16),
            ("written bf16", written, torch.bfloat16), ("written bf16, compiled", compiled, torch.bfloat16)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ms a call, median of {args.rounds}")
    print(f"{'':24s}" + "".join(f"{f'B={b} fwd':>12s}{f'B={b} f+b':>12s}" for b in args.batches.split(",")))
    for name, fn, dtype in rows:
        cells = []
        for b in (int(b) for b in args.batches.split(",")):
            cells += [median_ms(fn, b, dtype, False, args.rounds), median_ms(fn, b, dtype, True, args.rounds)]
        print(f"{name:24s}" + "".join(f"{c:12.3f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
