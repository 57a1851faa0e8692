"""Where a set of samples' FID comes from: the whole FID, then each class's Fréchet distance to the test
digits of that class, and the mean term of each (|mu_samples - mu_test|^2 in the classifier's features).

    python benchmarks/probes/fid_by_class.py A.npz B.npz ... [--real]

Each .npz is `ditkit sample --out X.npz` (images and labels). --real adds a row for real training digits
drawn in the first file's class counts: the floor of each column at these counts. Per-class distances on
~300 images are biased upward (as FID is at small n): compare rows, not against 0.
"""

from __future__ import annotations

import argparse

import numpy as np

from ditkit.data.mnist import load_mnist
from ditkit.eval.classifier import features
from ditkit.eval.fid import feature_stats, frechet_distance


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def row(name: str, feats: np.ndarray, labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray,
        classes: list[int]) -> dict:
    per = [distance(feats[labels == c], test_feats[test_labels == c]) for c in classes]
    mean_term = [float(((feats[labels == c].mean(0) - test_feats[test_labels == c].mean(0)) ** 2).sum())
                 for c in classes]
    return dict(name=name, fid=distance(feats, test_feats), per_class=per, mean_term=mean_term)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help=".npz files written by `ditkit sample --out X.npz`")
    ap.add_argument("--real", action="store_true", help="add real training digits in the first file's class counts")
    ap.add_argument("--seed", type=int, default=0, help="the draw of the real digits")
    args = ap.parse_args()

    x_test, y_test = load_mnist("test")
    f_test = features(x_test)
    classes = list(range(10))
    rows = []
    first_labels = None
    for path in args.samples:
        d = np.load(path)
        labels = d["labels"]
        first_labels = labels if first_labels is None else first_labels
        rows.append(row(path, features(d["images"]), labels, f_test, y_test, classes))
    if args.real:
        x_train, y_train = load_mnist("train")
        rng = np.random.default_rng(args.seed)
        idx = np.concatenate([rng.choice(np.flatnonzero(y_train == c), int((first_labels == c).sum()), replace=False)
                              for c in classes])
        rows.insert(0, row("real training digits", features(x_train[idx]), y_train[idx], f_test, y_test, classes))

    head = " ".join(f"{c:>5d}" for c in classes)
    print(f"{'':40s} {'FID':>6s} | per-class distance {head} | mean")
    for r in rows:
        print(f"{r['name'][-40:]:40s} {r['fid']:6.2f} | {'':18s} " + " ".join(f"{v:5.1f}" for v in r["per_class"])
              + f" | {np.mean(r['per_class']):5.1f}")
        print(f"{'':40s} {'':6s} | {'its mean term':18s} " + " ".join(f"{v:5.1f}" for v in r["mean_term"])
              + f" | {np.mean(r['mean_term']):5.1f}")


if __name__ == "__main__":
    main()
