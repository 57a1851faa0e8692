"""What the network's features know: a t-SNE (scikit-learn) of image features, coloured by label.

Two feature kinds, both read with forward hooks (removed afterwards; the model is not changed):
- "final":  the tokens entering `final_layer` (B, N, D), mean-pooled over the N patches -> (B, D);
- "patch":  the patch embeddings from `x_embedder` (B, N, D), flattened -> (B, N*D): a linear map of
            the pixels, the baseline that the final features should beat.
The images are fed with the *null* condition (class models), so any clustering by label comes from
the pixels, not from the label embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..condition import Condition
from ..errors import DitkitError, UsageError
from ..utils import ImageRNG, image_seeds
from .plots import save_figure
from .attention import DEFAULT_ATTN_SIGMA

FEATURE_KINDS = ("final", "patch")


@torch.no_grad()
def image_features(model, images: np.ndarray, kind: str = "final", *, sigma: float = DEFAULT_ATTN_SIGMA,
                   seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """uint8 (B, H, W, C) images -> float32 features (B, F), the net run once at noise level `sigma`."""
    if kind not in FEATURE_KINDS:
        raise UsageError(f"--tsne-features {kind!r}: allowed {', '.join(FEATURE_KINDS)}")
    net = model.net
    module = getattr(net, "final_layer" if kind == "final" else "x_embedder", None)
    if module is None:
        where = "final_layer" if kind == "final" else "x_embedder"
        raise DitkitError(f"{type(net).__name__} has no {where} to read features from")
    c, h, w = model.image_shape
    if images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise DitkitError(f"features: expected uint8 (B, {h}, {w}, {c}) images, got {images.shape}")
    dev = model.device
    denoiser = model.objective.denoiser(net)
    grabbed: list[torch.Tensor] = []
    if kind == "final":
        handle = module.register_forward_pre_hook(lambda m, args: grabbed.append(args[0].mean(dim=1)))  # (B, D)
    else:
        handle = module.register_forward_hook(lambda m, args, out: grabbed.append(out.flatten(1)))  # (B, N*D)
    out = []
    seeds = image_seeds(seed, len(images))
    try:
        for s in range(0, len(images), batch_size):
            chunk = torch.from_numpy(images[s:s + batch_size]).permute(0, 3, 1, 2).to(dev, torch.float32) / 127.5 - 1
            B = chunk.shape[0]
            x = chunk + sigma * ImageRNG(seeds[s:s + B], dev).randn((c, h, w))
            if model.num_classes > 0:
                cond = Condition.from_labels(torch.full((B,), model.num_classes, device=dev), model.num_classes)
            else:
                cond = Condition.none(B)
            grabbed.clear()
            denoiser(x, sigma, cond)
            out.append(grabbed[0].float().cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out)


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(B, F) -> (B, 2): PCA to at most 50 dimensions (the usual t-SNE preprocessing), then t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 5:
        raise DitkitError(f"t-SNE needs at least 5 images, got {n}")
    x = features.astype(np.float64)
    x = x - x.mean(axis=0)
    k = min(50, x.shape[1], n)
    if x.shape[1] > k:
        x = PCA(n_components=k, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (n - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500).fit_transform(x)


def plot_tsne(points: np.ndarray, labels: np.ndarray, out: str | Path, *, title: str,
              class_names: Optional[Sequence[str]] = None) -> Path:
    """Scatter of the 2-D embedding, one colour per label, with a legend."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.6), dpi=110)
    ax = fig.subplots()
    uniq = sorted(set(int(v) for v in labels))
    cmap = matplotlib.colormaps["tab10" if len(uniq) <= 10 else "tab20"]
    for j, lab in enumerate(uniq):
        m = labels == lab
        name = class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)
        ax.scatter(points[m, 0], points[m, 1], s=7, color=cmap(j % cmap.N), label=name, alpha=0.85, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if len(uniq) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save_figure(fig, out)
