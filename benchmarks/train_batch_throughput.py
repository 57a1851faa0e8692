"""Training images per second at several batch sizes and model shapes, compiled, in one process,
rounds alternated.

    python benchmarks/train_batch_throughput.py [--batches 32,64,128] [--shapes 4x128x4,6x192x6]
                                                [--blocks dit,rmsnorm+qknorm+swiglu+rope]
                                                [--rounds 4] [--seconds 4] [--eager] [--profile]

--shapes: DEPTHxWIDTHxHEADS of DiT-T/4 (default: the preset, 4x128x4).
--blocks: the block parts, comma-separated settings of '+'-joined parts: dit (DiT's own), rmsnorm, qknorm,
swiglu, rope (LightningDiT's; `ditkit train --norm rmsnorm --qk-norm --mlp swiglu --rope`).

The default recipe's step (DiT-T/4, linear interpolant, bf16 autocast where native) with fused AdamW
(the default optimiser until round 41, kept so that readings of a host's speed compare across rounds;
Muon's step runs ~8-10% slower: docs/BENCHMARKS.md, "Round 39") on random data: the network, loss and
optimiser only, without the data pipeline, EMA or logging, which add a fixed cost per step (and so favour
larger batches a little more than this shows). --profile then prints where 20 steps of each setting spend
their time (torch.profiler, operators by self time).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--shapes", default="4x128x4", help="DEPTHxWIDTHxHEADS, comma-separated")
    ap.add_argument("--blocks", default="dit", help="block parts: dit or '+'-joined rmsnorm, qknorm, swiglu, rope")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--eager", action="store_true", help="do not compile")
    ap.add_argument("--profile", action="store_true", help="also profile 20 steps of each setting")
    args = ap.parse_args()

    from ditkit.condition import Condition
    from ditkit.models import build_model, model_config
    from ditkit.objectives import build_objective
    from ditkit.train.config import TrainConfig
    from ditkit.utils import resolve_precision

    cfg = TrainConfig(max_steps=1)
    amp = resolve_precision(cfg.precision, torch.device("cpu")) == "bf16"
    objective = build_objective(cfg.objective_config())
    steps = {}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    parts = dict(dit={}, rmsnorm=dict(norm="rmsnorm"), qknorm=dict(qk_norm=True), swiglu=dict(mlp="swiglu"),
                 rope=dict(rope=True))
    blocks = {}
    for setting in args.blocks.split(","):
        unknown = [p for p in setting.split("+") if p not in parts]
        if unknown:
            ap.error(f"--blocks {setting}: unknown part {unknown[0]!r}; allowed: {', '.join(parts)}")
        blocks[setting] = {k: v for p in setting.split("+") for k, v in parts[p].items()}
    for (depth, width, heads), block, B in ((s, k, int(b)) for s in shapes for k in blocks
                                            for b in args.batches.split(",")):
        torch.manual_seed(0)
        model = build_model(model_config(cfg.model, depth=depth, hidden_size=width, num_heads=heads, **blocks[block]))
        key = f"{depth}x{width}x{heads} {block} batch {B:4d}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        net = model if args.eager else torch.compile(model, dynamic=False)
        x = torch.randn(B, 1, 28, 28)
        cond = Condition.from_labels(torch.randint(0, 10, (B,)), 10)

        def step(net=net, opt=opt, x=x, cond=cond):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = objective.loss(net, x, cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):  # compile and warm up
            step()
        steps[key] = (B, step)
    res: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, (B, step) in steps.items():
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < args.seconds:
                step()
                n += 1
            res[key].append(B * n / (time.perf_counter() - t))
    for key, v in res.items():
        print(f"{key}: {' '.join(f'{x:.0f}' for x in v)} img/s (median {sorted(v)[len(v) // 2]:.0f})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for key, (B, step) in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    step()
            print(f"{key}: 20 steps\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
