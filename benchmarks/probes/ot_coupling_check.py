"""Would minibatch optimal-transport coupling (Tong et al. 2023, "Improving and generalizing flow-based
generative models with minibatches of optimal transport"; Pooladian et al. 2023) straighten the training paths
of the default recipe? It pairs each batch's noise with its images by the assignment that minimises the total
squared distance. This measures how much shorter the pairs get on MNIST batches (pixels in [-1, 1]), per class
(the coupling that keeps each class's noise distribution exact) and over the whole batch.

    python benchmarks/probes/ot_coupling_check.py [--batches 64,256] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json

import torch
from scipy.optimize import linear_sum_assignment

from ditkit.data import load_dataset


def assigned_cost(cost: torch.Tensor) -> float:
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    data = load_dataset("mnist", "train")
    g = torch.Generator().manual_seed(0)
    for B in (int(b) for b in args.batches.split(",")):
        random = per_class = whole = 0.0
        for _ in range(args.rounds):
            idx = torch.randint(0, len(data), (B,), generator=g)
            xb, yb = data.batch(idx)  # in [-1, 1], as the training loop sees them
            xb = xb.flatten(1)
            eps = torch.randn(xb.shape, generator=g)
            cost = torch.cdist(xb, eps) ** 2
            random += float(cost.diag().sum())
            whole += assigned_cost(cost)
            for c in yb.unique():
                i = (yb == c).nonzero().squeeze(1)
                per_class += assigned_cost(cost[i][:, i])
        print(json.dumps(dict(batch=B, mean_sq_distance_random=random / (B * args.rounds),
                              per_class_ot_reduction=1 - per_class / random, whole_batch_ot_reduction=1 - whole / random)))


if __name__ == "__main__":
    main()
