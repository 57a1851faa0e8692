"""Training throughput of ditkit's DiT-T/4 against diffusers' DiTTransformer2DModel at the same shape,
measured side by side in one process (issue: core, figure 1).

    python benchmarks/train_throughput.py [--batch-size 128] [--rounds 5] [--seconds 8] [--compile]

Both models: 4 layers, width 128, 4 heads, patch 4, 28x28x1 inputs, 10 classes, adaLN-Zero, fp32,
AdamW, the same DDPM eps-prediction loss with one t per sample. Rounds alternate A, B, A, B ... so
that background load hits both alike; the median img/s per model is reported. --compile adds both networks
through torch.compile(dynamic=False), as `ditkit train` runs its network by default on runs of 3 minutes or
more (compilation is done before the timed rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ditkit.condition import Condition
from ditkit.models import build_model, model_config
from ditkit.objectives import DDPMObjective


def ditkit_step_fn(B: int, compile: bool = False):
    torch.manual_seed(0)
    model = build_model(model_config("DiT-T/4"))
    net = torch.compile(model, dynamic=False) if compile else model
    obj = DDPMObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as ditkit's training loop
    x = torch.randn(B, 1, 28, 28)
    y = torch.randint(0, 10, (B,))
    g = torch.Generator().manual_seed(0)

    def step():
        loss = obj.loss(net, x, Condition.from_labels(y, 10), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def diffusers_step_fn(B: int, compile: bool = False):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                                  num_layers=4, sample_size=28, patch_size=4, num_embeds_ada_norm=10,
                                  norm_type="ada_norm_zero")
    net = torch.compile(model, dynamic=False) if compile else model
    obj = DDPMObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(B, 1, 28, 28)
    y = torch.randint(0, 10, (B,))
    g = torch.Generator().manual_seed(0)
    abar_all = obj.alphas_cumprod.float()

    def step():
        t = torch.randint(0, 1000, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        abar = abar_all[t].view(B, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = net(x_t, timestep=t, class_labels=y).sample
        loss = F.mse_loss(out, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def measure(step, B: int, seconds: float) -> float:
    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * B / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--compile", action="store_true", help="also time both networks compiled")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch_size
    contestants = {"ditkit": ditkit_step_fn(B), "diffusers": diffusers_step_fn(B)}
    if args.compile:
        contestants["ditkit compiled"] = ditkit_step_fn(B, compile=True)
        contestants["diffusers compiled"] = diffusers_step_fn(B, compile=True)
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    for r in range(args.rounds):
        for name, (step, _) in contestants.items():
            rates[name].append(measure(step, B, args.seconds))
        print(f"round {r}: " + "   ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()) + " img/s", flush=True)
    res = dict(batch_size=B, threads=torch.get_num_threads(), ditkit_params=contestants["ditkit"][1],
               diffusers_params=contestants["diffusers"][1])
    for name, v in rates.items():
        res[name.replace(" ", "_") + "_img_per_s"] = statistics.median(v)
    res["speedup"] = res["ditkit_img_per_s"] / res["diffusers_img_per_s"]
    if args.compile:
        res["speedup_compiled"] = res["ditkit_compiled_img_per_s"] / res["diffusers_compiled_img_per_s"]
        res["speedup_as_run"] = res["ditkit_compiled_img_per_s"] / res["diffusers_img_per_s"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
