"""Sample-quality metrics with uncertainty: class accuracy, FID with a bootstrap interval, and the
real-data floor that FID values are judged against.

FID depends on the sample count n (it is biased upward at small n), so a generator's FID is only
meaningful next to the FID that *real* digits get at the same n: `real_data_floor(n)`. ditkit's
yardstick is the ratio fid / floor ("within 1.3× of the floor"). See `fid.FID_NOTE` for what this
FID is and is not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.mnist import load_mnist
from ..errors import DitkitError
from ..utils import atomic_write_json, default_cache_dir
from .classifier import (
    NUM_CLASSES,
    MnistClassifier,
    check_images,
    default_classifier,
    features,
    labels_from_features,
    weights_sha256,
)
from .fid import FID_NOTE, DistanceToReference, feature_stats, frechet_distance, one_blas_thread, reference_stats

DEFAULT_FID_BOOT = 100


def bootstrap_ci(
    values_or_fn: Any | Callable[[np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    n: int | None = None,
    recenter: bool = False,
) -> dict[str, float]:
    """Percentile bootstrap interval: dict(value, n, ci_low, ci_high).

    `values_or_fn` is either a 1-D array of per-sample values (the statistic is their mean) or a
    function `fn(index) -> float` of an int64 index array into n samples (then `n` is required);
    the point estimate is the statistic on all samples, each of the `n_boot` replicates on n
    indices drawn with replacement from one seeded generator.

    `recenter=True` shifts the replicates so their mean is the point estimate before the
    percentiles are read. Use it for statistics that resampling biases: a resample with
    replacement holds only ~63% distinct samples, so e.g. FID replicates sit above the point
    estimate by about its own small-n bias and a plain percentile interval can miss it entirely.
    """
    if n_boot < 2:
        raise DitkitError(f"bootstrap_ci: n_boot must be >= 2, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise DitkitError(f"bootstrap_ci: alpha must lie in (0, 1), got {alpha}")
    if callable(values_or_fn):
        if n is None or n < 1:
            raise DitkitError("bootstrap_ci: with a function, pass n (the number of samples it indexes), n >= 1")
        fn = values_or_fn
    else:
        values = np.asarray(values_or_fn, dtype=np.float64)
        if values.ndim != 1 or len(values) < 1:
            raise DitkitError(f"bootstrap_ci: expected a 1-D array of values, got shape {values.shape}")
        n = len(values)

        def fn(index: np.ndarray) -> float:
            return float(values[index].mean())

    rng = np.random.default_rng(seed)
    value = float(fn(np.arange(n)))
    with one_blas_thread():  # replicates are small linear algebra: see fid.one_blas_thread
        reps = np.array([fn(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    if recenter:
        reps += value - reps.mean()
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return {"value": value, "n": int(n), "ci_low": float(lo), "ci_high": float(hi)}


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0% and 100%, unlike bootstrap)."""
    if not 0 <= successes <= n or n < 1:
        raise DitkitError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    if not 0.0 < alpha < 1.0:
        raise DitkitError(f"wilson_interval: alpha must lie in (0, 1), got {alpha}")
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The exact bounds at 0 and n successes are 0 and 1; pin them against rounding.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _check_labels(labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DitkitError(f"labels must be an integer array of shape ({n},) (one per image), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DitkitError(f"labels must be digits 0..{NUM_CLASSES - 1}, got values in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _accuracy_dict(pred: np.ndarray, labels: np.ndarray, alpha: float, top_confusions: int = 5) -> dict[str, Any]:
    """Overall accuracy with its interval, the accuracy of each asked digit, and the most frequent
    misreadings (asked digit, digit read, count), most frequent first."""
    n = len(labels)
    correct = int((pred == labels).sum())
    lo, hi = wilson_interval(correct, n, alpha)
    per_class = {str(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    wrong = pred != labels
    pairs = Counter(zip(labels[wrong].tolist(), pred[wrong].tolist()))
    confusions = [{"asked": a, "read": r, "count": k}
                  for (a, r), k in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top_confusions]]
    return {"value": correct / n, "n": n, "ci_low": lo, "ci_high": hi, "per_class": per_class,
            "confusions": confusions}


def class_accuracy(
    images: Any, labels: Any, model: MnistClassifier | None = None, alpha: float = 0.05
) -> dict[str, Any]:
    """How often the classifier reads each image as its intended label: dict(value, n, ci_low, ci_high,
    per_class = {digit: accuracy}, confusions = the most frequent [{asked, read, count}]).

    The interval is the Wilson score interval (at 100% accuracy a bootstrap interval collapses to
    a point; Wilson still says how sure n images make us).
    """
    images = check_images(images)
    labels = _check_labels(labels, len(images))
    feats = features(images, model)
    return _accuracy_dict(labels_from_features(feats, model), labels, alpha)


def _fid_ci_from_features(
    feats: np.ndarray, model: MnistClassifier | None, n_boot: int, seed: int, alpha: float,
    cache_dir: str | os.PathLike | None,
) -> dict[str, float]:
    mu_ref, sigma_ref = reference_stats("test", cache_dir, model)
    to_reference = DistanceToReference(mu_ref, sigma_ref)

    def fid_of(index: np.ndarray) -> float:  # the replicates: the fast form of the same distance
        return to_reference(*feature_stats(feats[index]))

    ci = bootstrap_ci(fid_of, n_boot=n_boot, seed=seed, alpha=alpha, n=len(feats), recenter=True)
    # the point estimate by the general matrix square root (scipy's sqrtm, with its imaginary-part check)
    ci["value"] = frechet_distance(*feature_stats(feats), mu_ref, sigma_ref)
    # A Frechet distance is >= 0, but at small n the re-centring shift (the replicates' bias, which
    # grows as n falls) can carry the lower percentile below 0 (measured: -2.0 at n = 100).
    ci["ci_low"] = max(ci["ci_low"], 0.0)
    return ci


def fid_with_ci(
    images: Any,
    n_boot: int = DEFAULT_FID_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
    model: MnistClassifier | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """FID against the MNIST test reference with a bootstrap interval: dict(value, n, ci_low, ci_high).

    The interval resamples the generated images' features (the reference is fixed) and is
    re-centred on the point estimate (see `bootstrap_ci`): it is the spread of FID at this n. Its lower
    end stops at 0, where at small n the re-centring would carry it below.
    """
    images = check_images(images, min_count=2)
    return _fid_ci_from_features(features(images, model), model, n_boot, seed, alpha, cache_dir)


FLOOR_DRAWS = 5
_floor_memo: dict[Path, dict[str, Any]] = {}
_floor_lock = threading.Lock()


def real_data_floor_path(
    n: int, seed: int, draws: int, sha256: str, cache_dir: str | os.PathLike | None = None,
    class_counts: Sequence[int] | None = None,
) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    mix = "" if class_counts is None else "_mix" + hashlib.sha256(
        ",".join(str(int(k)) for k in class_counts).encode()).hexdigest()[:12]
    return root / "fid" / f"floor_mnist-train_n{n}_seed{seed}_draws{draws}{mix}_{sha256[:16]}.json"


def _read_floor(path: Path, sha: str, n: int, draws: int) -> dict[str, Any] | None:
    try:
        floor = json.loads(path.read_text())
        ok = floor["classifier_sha256"] == sha and floor["n"] == n and len(floor["values"]) == draws
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return floor if ok else None


def _draw_sets(pool: np.ndarray, k: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, k) indices into `pool`: disjoint sets while draws·k <= len(pool), else independent ones."""
    if draws * k <= len(pool):
        return pool[rng.permutation(len(pool))[: draws * k]].reshape(draws, k)
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(draws)])


def real_data_floor(
    n: int,
    seed: int = 0,
    draws: int = FLOOR_DRAWS,
    model: MnistClassifier | None = None,
    cache_dir: str | os.PathLike | None = None,
    class_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The FID that n real MNIST *training* digits get against the test reference: the best a
    generator can hope for at this n, and the yardstick of `evaluate_images`' ratio.

    One draw of n real digits is itself noisy (measured: at n = 1000, 12 draws gave 7.8 ± 2.5,
    with a long upper tail), so the floor is the mean over `draws` sets of n digits — disjoint
    while draws·n <= 60000, else drawn independently (each without replacement). Cached in
    memory and as a small JSON next to the reference statistics.

    With `class_counts` (digits per class, summing to n) every set holds exactly that many digits of each
    class instead of a random mix: the FID of real digits with a generator's label mix. The mix alone
    moves FID a lot at small n (n = 3,000: random 3.2, balanced 2.6, the training mix in exact counts 1.8;
    benchmarks/probes/label_mix.py).
    Returns dict(value, std, values, n, seed, draws, split, classifier_sha256[, class_counts]).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise DitkitError(f"real_data_floor: n must be an integer >= 2, got {n!r}")
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
        raise DitkitError(f"real_data_floor: draws must be an integer >= 1, got {draws!r}")
    n, draws = int(n), int(draws)
    if class_counts is not None:
        class_counts = [int(k) for k in class_counts]
        if len(class_counts) != NUM_CLASSES or min(class_counts) < 0 or sum(class_counts) != n:
            raise DitkitError(f"real_data_floor: class_counts must be {NUM_CLASSES} counts >= 0 summing to n = {n}, "
                              f"got {class_counts}")
    sha = weights_sha256(default_classifier() if model is None else model)
    path = real_data_floor_path(n, seed, draws, sha, cache_dir, class_counts)
    with _floor_lock:
        floor = _floor_memo.get(path) or (_read_floor(path, sha, n, draws) if path.exists() else None)
        if floor is None:
            images, labels = load_mnist("train", cache_dir=cache_dir)
            total = len(images)
            if n > total:
                raise DitkitError(f"real_data_floor: n = {n} exceeds the {total} MNIST training digits")
            rng = np.random.default_rng(seed)
            if class_counts is None:
                sets = _draw_sets(np.arange(total), n, draws, rng)  # (draws, n)
            else:
                pools = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
                short = [c for c, (k, pool) in enumerate(zip(class_counts, pools)) if k > len(pool)]
                if short:
                    raise DitkitError(f"real_data_floor: the training set has fewer digits of class {short[0]} "
                                      f"({len(pools[short[0]])}) than class_counts asks ({class_counts[short[0]]})")
                sets = np.concatenate([_draw_sets(pool, k, draws, rng) for k, pool in zip(class_counts, pools) if k],
                                      axis=1)
            needed = np.unique(sets)  # each digit's features are computed once
            feats = features(images[needed], model)  # (len(needed), 128)
            ref = reference_stats("test", cache_dir, model)
            values = [frechet_distance(*feature_stats(feats[np.searchsorted(needed, s)]), *ref) for s in sets]
            floor = {
                "value": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if draws > 1 else 0.0,
                "values": [float(v) for v in values],
                "n": n,
                "seed": seed,
                "draws": draws,
                "split": "train",
                "classifier_sha256": sha,
            }
            if class_counts is not None:
                floor["class_counts"] = class_counts
            atomic_write_json(path, floor)
        _floor_memo[path] = floor
        return copy.deepcopy(floor)


def evaluate_images(
    images: Any,
    labels: Any = None,
    *,
    n_boot: int = DEFAULT_FID_BOOT,
    seed: int = 0,
    alpha: float = 0.05,
    model: MnistClassifier | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Everything at once, from one pass of the classifier over the images.

    Returns dict(n, fid, fid_ci = [low, high], fid_floor, fid_floor_std, fid_ratio (fid / floor at this n),
    class_accuracy (dict or None when no labels), classifier_sha256, reference, note = FID_NOTE), and with
    labels also fid_floor_same_mix (the floor of real digits in the labels' class counts) and fid_ratio_same_mix.
    """
    images = check_images(images, min_count=2)
    labels = None if labels is None else _check_labels(labels, len(images))
    feats = features(images, model)
    fid = _fid_ci_from_features(feats, model, n_boot, seed, alpha, cache_dir)
    floor = real_data_floor(len(images), seed=seed, model=model, cache_dir=cache_dir)
    accuracy, same_mix = None, {}
    if labels is not None:
        accuracy = _accuracy_dict(labels_from_features(feats, model), labels, alpha)
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        _, train_labels = load_mnist("train", cache_dir=cache_dir)
        if (counts <= np.bincount(train_labels, minlength=NUM_CLASSES)).all():  # else real digits cannot match it
            mix = real_data_floor(len(images), seed=seed, model=model, cache_dir=cache_dir, class_counts=counts.tolist())
            same_mix = {"fid_floor_same_mix": mix["value"],
                        "fid_ratio_same_mix": fid["value"] / mix["value"] if mix["value"] > 0 else math.inf}
    return {
        "n": len(images),
        "fid": fid["value"],
        "fid_ci": [fid["ci_low"], fid["ci_high"]],
        "fid_floor": floor["value"],
        "fid_floor_std": floor["std"],
        "fid_ratio": fid["value"] / floor["value"] if floor["value"] > 0 else math.inf,
        "class_accuracy": accuracy,
        **same_mix,
        "classifier_sha256": weights_sha256(default_classifier() if model is None else model),
        "reference": "mnist-test",
        "note": FID_NOTE,
    }
