"""How much the class mix of n digits moves ditkit's FID, measured on real MNIST training digits.

FID's floor is n real training digits drawn at random: their class counts are a multinomial draw around
the training mix. A class-conditional generator chooses its labels, and `ditkit eval` draws them as
`sampling.stratified_labels` does: the training mix in exact counts ('prior'). This script gives real
digits each of those label mixes and prints the FID they get against the test reference, so a
generator's figure can be read against the one that real digits with the same mix get.

    python benchmarks/label_mix.py --num 3000 --draws 10
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--draws", type=int, default=10, help="sets of real digits per mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    from ditkit.data.mnist import load_mnist
    from ditkit.eval.classifier import features
    from ditkit.eval.fid import feature_stats, frechet_distance, reference_stats
    from ditkit.eval.metrics import real_data_floor
    from ditkit.sampling import stratified_labels

    images, labels = load_mnist("train")
    feats = features(images)
    ref = reference_stats("test")
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    counts = np.bincount(labels, minlength=10)
    rng = np.random.default_rng(args.seed)

    def with_counts(share: np.ndarray) -> np.ndarray:
        return np.concatenate([rng.choice(idx, k, replace=False) for idx, k in zip(by_class, share)])

    mixes = {
        "random (the floor's draw)": lambda: rng.choice(len(images), args.num, replace=False),
        "balanced, exact (--labels all)": lambda: with_counts(np.bincount(np.arange(args.num) % 10, minlength=10)),
        "training mix, exact (--labels prior)": lambda: with_counts(
            np.bincount(stratified_labels(counts, args.num), minlength=10)),
        "training mix, multinomial": lambda: with_counts(rng.multinomial(args.num, counts / counts.sum())),
    }
    rows = []
    for name, draw in mixes.items():
        fids = [frechet_distance(*feature_stats(feats[draw()]), *ref) for _ in range(args.draws)]
        rows.append(dict(mix=name, n=args.num, draws=args.draws, fid_mean=float(np.mean(fids)),
                         fid_std=float(np.std(fids, ddof=1)), fids=[float(f) for f in fids]))
        print(f"{name:<40} FID {np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f} over {args.draws} sets of {args.num}",
              flush=True)
    floor = real_data_floor(args.num)
    print(f"ditkit's floor at n = {args.num} (random draws, seed 0): {floor['value']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, floor=floor["value"]), f, indent=1)


if __name__ == "__main__":
    main()
