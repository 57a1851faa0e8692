"""Training throughput of ditkit's DiT-T/4 against diffusers' DiTTransformer2DModel at the same shape,
measured side by side in one process (issue: core, figure 1).

    python benchmarks/train_throughput.py [--batch-size 128] [--rounds 5] [--seconds 8]

Both models: 4 layers, width 128, 4 heads, patch 4, 28x28x1 inputs, 10 classes, adaLN-Zero, fp32,
AdamW, the same DDPM eps-prediction loss with one t per sample. Rounds alternate A, B, A, B ... so
that background load hits both alike; the median img/s per model is reported.
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


def ditkit_step_fn(B: int):
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4"))
    obj = DDPMObjective()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as ditkit's training loop
    x = torch.randn(B, 1, 28, 28)
    y = torch.randint(0, 10, (B,))
    g = torch.Generator().manual_seed(0)

    def step():
        loss = obj.loss(net, x, Condition.from_labels(y, 10), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, sum(p.numel() for p in net.parameters())


def diffusers_step_fn(B: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                                num_layers=4, sample_size=28, patch_size=4, num_embeds_ada_norm=10,
                                norm_type="ada_norm_zero")
    obj = DDPMObjective()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
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
    return step, sum(p.numel() for p in net.parameters())


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
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch_size
    ours, n_ours = ditkit_step_fn(B)
    theirs, n_theirs = diffusers_step_fn(B)
    a, b = [], []
    for r in range(args.rounds):
        a.append(measure(ours, B, args.seconds))
        b.append(measure(theirs, B, args.seconds))
        print(f"round {r}: ditkit {a[-1]:.1f} img/s   diffusers {b[-1]:.1f} img/s", flush=True)
    res = dict(batch_size=B, threads=torch.get_num_threads(), ditkit_params=n_ours, diffusers_params=n_theirs,
               ditkit_img_per_s=statistics.median(a), diffusers_img_per_s=statistics.median(b))
    res["speedup"] = res["ditkit_img_per_s"] / res["diffusers_img_per_s"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
