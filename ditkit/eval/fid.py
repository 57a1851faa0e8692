"""Fréchet distance between Gaussians fitted to classifier features, the two-step way.

1. `reference_stats()` computes (mu, sigma) of the real MNIST test digits once and caches them as an
   `.npz` keyed by the classifier's weights hash (new weights → new statistics, never stale ones).
2. `frechet_distance(mu1, sigma1, mu2, sigma2)` is a pure function (Heusel et al. 2017, eq. for
   FID; Dowson & Landau 1982):

       d² = |mu1 − mu2|² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2})

`fid_from_images()` joins them. The features are not Inception's: read `FID_NOTE`.
"""

from __future__ import annotations

import io
import os
import contextlib
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg

from ..data.mnist import load_mnist
from ..errors import DitkitError
from ..utils import atomic_write_bytes, default_cache_dir
from .classifier import FEATURE_DIM, MnistClassifier, check_images, default_classifier, features, weights_sha256

FID_NOTE = (
    "ditkit's FID is computed on the 128-d penultimate features of ditkit's own MNIST classifier "
    "(ditkit/eval/classifier.py, sha256-pinned weights) against the 10k MNIST test digits - "
    "not on Inception-v3 pool3 features against ImageNet-trained statistics. Its values compare "
    "only with other ditkit FIDs (same classifier weights, same reference, similar sample count), "
    "never with FID numbers published in papers. The ratio to the real-data floor compares only at the "
    "same n too: FID's finite-sample bias, shared by the samples and the floor, weighs more at small n "
    "and pulls the ratio toward 1."
)

REFERENCE_SPLITS = ("test", "train")
# Largest |imag| tolerated on the diagonal of sqrtm(sigma1 sigma2) before we call it a failure
# (the threshold of the reference implementations, TTUR / pytorch-fid).
IMAG_TOL = 1e-3


_blas_controller: Any = None
_blas_controller_lock = threading.Lock()


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Run small (128×128) linear algebra on one BLAS thread.

    Measured on the shared 2-core machine: one 128×128 `sqrtm` takes ~30 ms single-threaded but
    0.5–4 s when OpenBLAS spreads it over threads that compete with other processes. threadpoolctl
    ships with scikit-learn (a ditkit dependency); without it this is a no-op. The loaded BLAS
    libraries are found once per process (a scan of the process's libraries, ~3 ms, was paid on every
    call: 0.6 s of a 3.5 s evaluation of 20 images).
    """
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    with _blas_controller_lock:
        if _blas_controller is None:
            _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


class FrechetDistanceError(DitkitError, ValueError):
    """The matrix square root came out genuinely complex: the covariances are not valid."""


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D), N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise DitkitError(f"feature_stats: expected features (N, D) with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise DitkitError("feature_stats: features contain NaN or inf")
    with one_blas_thread():
        return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns when the product is (near) singular; we judge the result ourselves below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def _max_imag_diag(m: np.ndarray) -> float:
    return float(np.abs(np.diagonal(m).imag).max()) if np.iscomplexobj(m) else 0.0


def frechet_distance(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2). Pure, float64.

    sqrtm(sigma1 sigma2) of two PSD matrices has real eigenvalues >= 0, but a (near) singular
    product — fewer samples than dimensions, dead features — can make the numerical square root
    non-finite or slightly complex. As in the reference implementations we then retry with
    eps·I added to both covariances; a residual imaginary diagonal above 1e-3 means the inputs
    are not covariances (or are hopelessly ill-conditioned) and raises `FrechetDistanceError`;
    below that it is rounding noise and the real part is taken.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DitkitError(
            f"frechet_distance: expected mu (D,) and sigma (D, D) for both, got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise DitkitError(f"frechet_distance: {name} contains NaN or inf")

    with one_blas_thread():
        covmean = _sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all() or _max_imag_diag(covmean) > IMAG_TOL:
            offset = np.eye(d) * eps
            covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise FrechetDistanceError("frechet_distance: sqrtm(sigma1 sigma2) is not finite even with eps added")
    max_imag = _max_imag_diag(covmean)
    if max_imag > IMAG_TOL:
        raise FrechetDistanceError(
            f"frechet_distance: sqrtm(sigma1 sigma2) has imaginary diagonal up to {max_imag:.3g} (> {IMAG_TOL}); "
            "sigma1 and sigma2 must be symmetric positive semi-definite covariances"
        )
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class DistanceToReference:
    """The Fréchet distance from many Gaussians to one fixed reference N(mu_ref, sigma_ref): FID's
    bootstrap replicates (`metrics.fid_with_ci`).

    With R = sigma_ref^{1/2} (symmetric, computed once), tr (sigma sigma_ref)^{1/2} = tr (R sigma R)^{1/2}:
    sigma R·R and R·sigma R share their eigenvalues (AB and BA do), and R sigma R is symmetric positive
    semi-definite, so a symmetric eigendecomposition gives the trace: ~2 ms against ~25 ms for the general
    `scipy.linalg.sqrtm` of `frechet_distance`, with which it agrees to rounding (tested). The point
    estimate of a FID stays `frechet_distance`'s.
    """

    def __init__(self, mu_ref: Any, sigma_ref: Any):
        self.mu = np.asarray(mu_ref, dtype=np.float64)
        sigma = np.asarray(sigma_ref, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 1 or sigma.shape != (d, d) or not (np.isfinite(self.mu).all() and np.isfinite(sigma).all()):
            raise DitkitError(f"DistanceToReference: expected finite mu (D,) and sigma (D, D), got {self.mu.shape}, "
                              f"{sigma.shape}")
        sigma = (sigma + sigma.T) / 2
        with one_blas_thread():
            w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, mu: Any, sigma: Any) -> float:
        mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        if mu.shape != self.mu.shape or sigma.shape != self.root.shape:
            raise DitkitError(f"DistanceToReference: expected mu {self.mu.shape} and sigma {self.root.shape}, "
                              f"got {mu.shape} and {sigma.shape}")
        inner = self.root @ sigma @ self.root
        with one_blas_thread():
            eig = np.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum())


# ---------------------------------------------------------------------------------------------
# Reference statistics, cached on disk (and in memory) per classifier hash.
# ---------------------------------------------------------------------------------------------

_memo: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
_memo_lock = threading.Lock()


def reference_stats_path(split: str, sha256: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/fid/mnist_<split>_<sha256[:16]>.npz`; the full hash is stored inside and checked."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "fid" / f"mnist_{split}_{sha256[:16]}.npz"


def _read_stats(path: Path, sha256: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (mu, sigma) if the file is readable, well-formed and made by these weights."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["classifier_sha256"]) != sha256:
                return None
            mu, sigma = z["mu"], z["sigma"]
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        return None
    return mu, sigma


def reference_stats(
    split: str = "test", cache_dir: str | os.PathLike | None = None, model: MnistClassifier | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu (128,), sigma (128, 128)) of the real MNIST `split` digits' classifier features.

    Computed once and cached in `<cache>/fid/` (cache defaults to $DITKIT_CACHE or ~/.cache/ditkit;
    MNIST itself is read from the same cache root). A cache written by other weights is recomputed.
    """
    if split not in REFERENCE_SPLITS:
        raise DitkitError(f"reference_stats: split {split!r}: allowed values are {', '.join(REFERENCE_SPLITS)}")
    model = default_classifier() if model is None else model
    sha = weights_sha256(model)
    path = reference_stats_path(split, sha, cache_dir)
    key = (split, sha, str(path))
    with _memo_lock:
        if key in _memo:
            return _memo[key][0].copy(), _memo[key][1].copy()
        stats = _read_stats(path, sha) if path.exists() else None
        if stats is None:
            images, _ = load_mnist(split, cache_dir=cache_dir)
            mu, sigma = feature_stats(features(images, model))
            buf = io.BytesIO()
            np.savez(buf, mu=mu, sigma=sigma, classifier_sha256=np.array(sha), n=np.array(len(images)))
            atomic_write_bytes(path, buf.getvalue())
            stats = (mu, sigma)
        _memo[key] = stats
    return stats[0].copy(), stats[1].copy()


def clear_reference_memo() -> None:
    """Forget the in-memory copies (the files on disk stay)."""
    with _memo_lock:
        _memo.clear()


def fid_from_images(
    images: Any,
    model: MnistClassifier | None = None,
    split: str = "test",
    cache_dir: str | os.PathLike | None = None,
) -> float:
    """FID of `images` (uint8/float 28×28, N >= 2) against the real MNIST `split` reference.

    FID is biased upward at small N: compare values at equal N (see `metrics.real_data_floor`).
    """
    images = check_images(images, min_count=2)
    mu, sigma = feature_stats(features(images, model))
    return frechet_distance(mu, sigma, *reference_stats(split, cache_dir, model))

