"""How much the class mix of n digits moves ditkit's FID, measured on real MNIST training digits.

FID's floor is n real training digits drawn at random: their class counts are a multinomial draw around
the training mix. A class-conditional generator chooses its labels, and `ditkit eval` draws them as
`sampling.stratified_labels` does: the training mix in exact counts ('prior'). This script gives real
digits each of those label mixes and prints the FID they get against the test reference, so a
generator's figure can be read against the one that real digits with the same mix get.

With --ckpt it reads a generator's own images the same way, paired: one pool of --pool balanced images
(e.g. 400 of each digit), then --draws subsets of --num of them, balanced or in the training mix, so the
two mixes differ in nothing but their counts.

    python benchmarks/probes/label_mix.py --num 3000 --draws 10
    python benchmarks/probes/label_mix.py --ckpt runs/exp/base30_s0 --pool 4000 --num 3000 --draws 20 \
        --cfg-scale 1.05 --reject 0.08
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--draws", type=int, default=10, help="sets of --num digits per mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--ckpt", help="read this run's images instead of real digits")
    ap.add_argument("--pool", type=int, default=4000, help="--ckpt: balanced images drawn once (seeds 0..pool-1)")
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--reject", type=float, default=None)
    args = ap.parse_args()

    from ditkit.data.mnist import load_mnist
    from ditkit.eval.classifier import features
    from ditkit.eval.fid import feature_stats, frechet_distance, reference_stats
    from ditkit.eval.metrics import real_data_floor
    from ditkit.sampling import stratified_labels

    images, labels = load_mnist("train")
    counts = np.bincount(labels, minlength=10)  # the training mix
    if args.ckpt:
        from ditkit.sampling import generate, load_model

        res = generate(load_model(args.ckpt, compile=True), num=args.pool, labels="all", seed=args.seed,
                       batch_size=250, cfg_scale=args.cfg_scale, reject=args.reject)
        images, labels = res["images"], res["labels"]
    feats = features(images)
    ref = reference_stats("test")
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = np.random.default_rng(args.seed)

    def with_counts(share: np.ndarray) -> np.ndarray:
        return np.concatenate([rng.choice(idx, k, replace=False) for idx, k in zip(by_class, share)])

    mixes = {} if args.ckpt else {"random (the floor's draw)": lambda: rng.choice(len(images), args.num, replace=False)}
    mixes.update({
        "balanced, exact (--labels all)": lambda: with_counts(np.bincount(np.arange(args.num) % 10, minlength=10)),
        "training mix, exact (--labels prior)": lambda: with_counts(
            np.bincount(stratified_labels(counts, args.num), minlength=10)),
        "training mix, multinomial": lambda: with_counts(rng.multinomial(args.num, counts / counts.sum())),
    })
    floor = real_data_floor(args.num)["value"]
    rows = []
    for name, draw in mixes.items():
        fids = [frechet_distance(*feature_stats(feats[draw()]), *ref) for _ in range(args.draws)]
        rows.append(dict(mix=name, n=args.num, draws=args.draws, fid_mean=float(np.mean(fids)),
                         fid_std=float(np.std(fids, ddof=1)), fids=[float(f) for f in fids]))
        print(f"{name:<40} FID {np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f} (ratio {np.mean(fids) / floor:.2f}x) "
              f"over {args.draws} sets of {args.num}", flush=True)
    print(f"ditkit's floor at n = {args.num} (random draws, seed 0): {floor:.2f}"
          + (f"; images of {args.ckpt}, CFG {args.cfg_scale:g}, reject {args.reject}" if args.ckpt else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, floor=floor, ckpt=args.ckpt, cfg_scale=args.cfg_scale, reject=args.reject), f, indent=1)


if __name__ == "__main__":
    main()
