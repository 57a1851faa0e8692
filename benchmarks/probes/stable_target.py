"""How much of the training target's noise does `ditkit train --stable-target M` remove, and at what cost?

The linear interpolant learns E[v | x_t] from samples of v = eps - x0; the plain target's deviation from that
regression target is noise the network must average out over many steps. For MNIST's training set as the
data distribution, E[x0 | x_t, class] is an exact sum over the class's images (~5,000), so the regression
target is known exactly. For a batch of training rows at fixed times t this prints the mean squared
deviation from it of the plain target and of the stable target (own image + M reference images drawn from
the whole set, of the row's class; `objectives.base.stable_target_x0`), and the per-step cost of drawing
and weighing the references at the training batch size.

    python benchmarks/probes/stable_target.py [--refs 256,1024,4096] [--rows 256] [--times 0.3,0.5,...] [--batch 64]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ditkit.condition import Condition
from ditkit.data import load_dataset
from ditkit.objectives.base import stable_target_x0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", default="256,1024,4096")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--times", default="0.3,0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--batch", type=int, default=64, help="the training batch, for the cost per step")
    ap.add_argument("--label-dropout", type=float, default=0.1, help="the training's, for the cost per step")
    args = ap.parse_args()
    data = load_dataset("mnist", "train")
    g = torch.Generator().manual_seed(0)
    X, Y = data.batch(torch.arange(len(data)))
    x0, y = data.batch(torch.randint(0, len(data), (args.rows,), generator=g))
    eps = torch.randn(x0.shape, generator=g)
    cond = Condition.from_labels(y, data.num_classes)
    refs = [int(m) for m in args.refs.split(",")]
    times = [float(t) for t in args.times.split(",")]
    ref_sets = {m: data.batch(torch.randint(0, len(data), (m,), generator=g)) for m in refs}
    print(f"{args.rows} rows, MNIST train ({len(data)} images); mean squared deviation per pixel of the "
          "velocity target from E[v | x_t, class] (exact over the class's images)\n")
    print("| t | logit-normal density | plain | " + " | ".join(f"M = {m}" for m in refs) + " |")
    print("|---:|---:|---:|" + "---:|" * len(refs))
    tot = {k: 0.0 for k in ["plain", *refs]}
    wsum = 0.0
    for t in times:
        a = torch.full((args.rows, 1, 1, 1), 1 - t)
        s = torch.full((args.rows, 1, 1, 1), t)
        x_t = a * x0 + s * eps
        exact = torch.empty_like(x0)
        for c in range(data.num_classes):  # the whole class as the reference set (the own image is in it)
            rows = (y == c).nonzero().flatten()
            if len(rows):
                exact[rows] = stable_target_x0(x0[rows], eps[rows], a[rows], s[rows], Condition.none(len(rows)),
                                               X[Y == c], None)
        v_exact = (x_t - exact) / t
        dev = {"plain": float(((eps - x0) - v_exact).pow(2).mean())}
        for m in refs:
            hat = stable_target_x0(x0, eps, a, s, cond, *ref_sets[m])
            dev[m] = float(((x_t - hat) / t - v_exact).pow(2).mean())
        dens = math.exp(-0.5 * math.log(t / (1 - t)) ** 2) / (math.sqrt(2 * math.pi) * t * (1 - t))
        wsum += dens
        for k in tot:
            tot[k] += dens * dev[k]
        print(f"| {t:g} | {dens:.2f} | {dev['plain']:.4f} | " + " | ".join(f"{dev[m]:.4f}" for m in refs) + " |")
    print("| weighted by the density | | " + f"{tot['plain'] / wsum:.4f} | "
          + " | ".join(f"{tot[m] / wsum:.4f} ({tot[m] / tot['plain']:.0%})" for m in refs) + " |")

    B = args.batch
    xb, yb = x0[:B], cond.labels[:B].clone()
    yb[torch.rand(B, generator=g) < args.label_dropout] = data.num_classes  # dropped labels weigh every reference
    t = torch.rand(B, generator=g).view(-1, 1, 1, 1)
    print(f"\ncost per training step at batch {B}, {int((yb == data.num_classes).sum())} rows without a label "
          "(draw M references from the set, weigh them), best of 20:")
    for m in refs:
        best = math.inf
        for _ in range(20):
            t0 = time.perf_counter()
            rx, ry = data.draw(m, g)  # as training draws them
            stable_target_x0(xb, eps[:B], 1 - t, t, Condition.from_labels(yb, data.num_classes), rx, ry)
            best = min(best, time.perf_counter() - t0)
        print(f"  M = {m}: {best * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
