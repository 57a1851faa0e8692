"""Training steps per second, eager against `torch.compile` (the probe from before compiled training was
wired into `ditkit train`, which compiles by `--compile auto` since round 6; `train_compile_variants.py`
compares ways to compile it). The recipe's shape then: DiT-T/4, batch 32, bf16 autocast, AdamW, the linear
interpolant's loss, gradient clipping; a fixed batch, so only the arithmetic is timed.

    python benchmarks/probes/train_compile.py eager
    python benchmarks/probes/train_compile.py compile
"""

from __future__ import annotations

import sys
import time

import torch

from ditkit.condition import Condition
from ditkit.models import build_model, model_config
from ditkit.objectives import build_objective


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
    if mode not in ("eager", "compile"):
        raise SystemExit("usage: train_compile.py eager|compile")
    torch.manual_seed(0)
    model = build_model(model_config("DiT-T/4"))
    obj = build_objective({"name": "linear", "prediction": "velocity", "time_sampling": "logit-normal", "label_dropout": 0.1})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(1)
    B = 32
    x = torch.rand(B, 1, 28, 28) * 2 - 1
    cond = Condition.from_labels(torch.randint(0, 10, (B,)), 10)
    net = torch.compile(model, dynamic=False) if mode == "compile" else model

    def step():
        noise = obj.sample_noise(B, (1, 28, 28), g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = obj.loss(net, x, cond, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    t0 = time.perf_counter()
    step()
    step()
    first = time.perf_counter() - t0
    for _ in range(20):
        step()
    t0 = time.perf_counter()
    n = 300
    for _ in range(n):
        step()
    print(f"{mode}: first two steps {first:.1f} s, then {n / (time.perf_counter() - t0):.1f} steps/s")


if __name__ == "__main__":
    main()
