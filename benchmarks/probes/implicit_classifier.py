"""How well a run's own conditional denoisers read real digits: the implicit classifier behind
`ditkit sample/eval --reject` (ditkit/samplers/implicit.py), level by level and summed.

    python benchmarks/probes/implicit_classifier.py --ckpt runs/exp/base30_s0 --num 500

For each of `--num` MNIST training digits (never the test digits, FID's reference), the denoising error of
every class at each noise level of `implicit.SIGMAS`, with one noise draw per level shared by the classes;
prints the share read as their true class by each level alone and by the sum (what --reject uses), and
the relative margin's quantiles on the correctly read digits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ditkit.data.mnist import load_mnist
from ditkit.samplers.implicit import SIGMAS, class_errors, relative_margin
from ditkit.sampling import load_model
from ditkit.utils import ImageRNG, image_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.ckpt)
    x, y = load_mnist("train")
    x = torch.from_numpy(x[:args.num]).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(np.asarray(y[:args.num])).long()
    D = model.objective.denoiser(model.net)
    seeds = image_seeds(0, args.num)
    t0 = time.perf_counter()
    per_level = []
    for i in range(0, args.num, args.batch_size):
        sl = slice(i, i + args.batch_size)
        rng = ImageRNG(seeds[sl])  # one level at a time from one stream: the very draws of the summed call
        per_level.append(torch.stack([class_errors(D, x[sl], model.num_classes, rng, sigmas=(s,))
                                      for s in SIGMAS], -1))
    E = torch.cat(per_level)  # (N, K, levels)
    print(f"{args.num} training digits, {len(SIGMAS)} levels x {model.num_classes} classes, "
          f"{time.perf_counter() - t0:.1f} s ({model.checkpoint})")
    for j, s in enumerate(SIGMAS):
        print(f"  sigma {s:5.2f} alone: {100 * (E[..., j].argmin(1) == y).float().mean():.1f}% read right")
    total = E.sum(-1)
    right = total.argmin(1) == y
    print(f"  summed (--reject's evidence): {100 * right.float().mean():.1f}% read right")
    m = relative_margin(total, y)[right]
    q = np.quantile(m.numpy(), [0.05, 0.25, 0.5, 0.75, 0.95])
    print("  relative margin of the digits read right, 5/25/50/75/95%: " + " ".join(f"{v:.3f}" for v in q))


if __name__ == "__main__":
    main()
