"""Ways to compile the training step, against the one `ditkit train` uses.

    python benchmarks/probes/train_compile_variants.py [--variants default,regional,autotune] [--rounds 12]
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/probes/train_compile_variants.py --variants regional

The recipe's step (DiT-T/4, batch 64, bf16 autocast, the linear interpolant's loss) with fused AdamW (the
default optimiser until round 41) through `ditkit.train.loop._probe_step`, the function a run compiles with:
- default: `torch.compile(model, dynamic=False)`, what `ditkit train` does;
- regional: each DiT block compiled on its own (`block.compile(dynamic=False)`; the blocks share their
  code, so one graph serves all four), the embeddings and the final layer eager: less to compile;
- autotune: the whole model with inductor's max-autotune and its C++ GEMM template as a candidate
  (`max_autotune_gemm_backends="CPP,ATEN"`), which benchmarks each matrix product's kernels at compile time.

Prints each variant's first step (its compilation: run one variant with an empty inductor cache, as in the
second line, to time a clean machine's first run) and the median milliseconds a training step, the
variants' rounds alternated in one process (this host's speed drifts by tens of percent within minutes).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ditkit.models import build_model, model_config
from ditkit.objectives import build_objective
from ditkit.train.config import TrainConfig
from ditkit.train.loop import BASE_BATCH, _probe_step

CPU = torch.device("cpu")


def compiled(model: torch.nn.Module, variant: str):
    if variant == "default":
        return torch.compile(model, dynamic=False)
    if variant == "regional":
        for block in model.blocks:
            block.compile(dynamic=False)
        return model
    if variant == "autotune":
        return torch.compile(model, dynamic=False,
                             options={"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
    raise SystemExit(f"unknown variant {variant!r}: allowed default, regional, autotune")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,regional,autotune")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20, help="training steps a round")
    args = ap.parse_args()
    variants = args.variants.split(",")
    recipe = TrainConfig(out="unused")  # the default recipe's model and objective, on MNIST's shape
    base_config = model_config(recipe.model)
    objective = build_objective(recipe.objective_config(depth=base_config.depth))
    torch.manual_seed(0)
    base = build_model(base_config)
    shape = (base_config.in_channels, base_config.input_size, base_config.input_size)
    runs = {}
    for v in variants:
        model = copy.deepcopy(base).train()
        net = compiled(model, v)
        t = time.perf_counter()
        _probe_step(net, objective, shape, BASE_BATCH, base_config.num_classes, CPU, True)
        print(f"{v}: first step (compiling) {time.perf_counter() - t:.1f} s", flush=True)
        runs[v] = (net, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), [])

    def round_ms(v: str, n: int) -> float:
        net, opt, _ = runs[v]
        t = time.perf_counter()
        for _ in range(n):
            _probe_step(net, objective, shape, BASE_BATCH, base_config.num_classes, CPU, True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return 1e3 * (time.perf_counter() - t) / n

    for v in variants:
        round_ms(v, 10)  # warm-up
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            runs[v][2].append(round_ms(v, args.steps))
    ref = runs[variants[0]][2]
    for v in variants:
        ts = runs[v][2]
        ratio = statistics.median(a / b for a, b in zip(ref, ts))
        print(f"{v}: median {statistics.median(ts):.1f} ms a step (min {min(ts):.1f}); "
              f"paired speed against {variants[0]}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
