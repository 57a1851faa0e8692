"""Attention maps of a DiT: where each patch looks, drawn over the image.

Capture is opt-in: `Attention.capture` is None on the normal path (one attribute check, the fused
`F.scaled_dot_product_attention` kernel untouched); `capture_attention` sets it to a list on the chosen
layers for the duration of a `with` block and always puts None back, even when the forward fails.

    with capture_attention(net, layers=[2]) as store:
        net(x, t, cond)
    probs = store[2][0]  # (B, H, N, N): row q is the distribution of query patch q over the N keys
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..condition import Condition
from ..errors import DitkitError
from ..utils import ImageRNG, atomic_write_bytes

# The noise level at which the network looks at a clean image: low enough that the picture is still
# plainly visible in x, high enough to sit inside every objective's trained sigma range.
DEFAULT_ATTN_SIGMA = 0.3


def _blocks(net: nn.Module) -> nn.ModuleList:
    blocks = getattr(net, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "capture") for b in blocks):
        raise DitkitError(f"{type(net).__name__}: no transformer blocks with capturable attention (net.blocks[i].attn)")
    return blocks


def describe_attention(net: nn.Module) -> str:
    """'4 layers (0-3), 4 heads each (0-3)': what a user may ask for."""
    blocks = _blocks(net)
    heads = blocks[0].attn.num_heads if len(blocks) else 0
    return f"{len(blocks)} layers (0-{len(blocks) - 1}), {heads} heads each (0-{heads - 1})"


def check_layer_head(net: nn.Module, layer: Optional[int] = None, head: Optional[int] = None) -> None:
    """Raise DitkitError naming what exists when `layer` or `head` does not."""
    blocks = _blocks(net)
    if layer is not None and not 0 <= layer < len(blocks):
        raise DitkitError(f"attention layer {layer} does not exist: this model has {describe_attention(net)}")
    if head is not None and not 0 <= head < blocks[0].attn.num_heads:
        raise DitkitError(f"attention head {head} does not exist: this model has {describe_attention(net)}")


@contextlib.contextmanager
def capture_attention(net: nn.Module, layers: Optional[Sequence[int]] = None) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record attention probabilities (B, H, N, N) of `layers` (default: all) on every forward inside the block.

    Yields {layer: [probs of forward 1, probs of forward 2, ...]}. Capture is switched off again on exit.
    """
    blocks = _blocks(net)
    layers = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    for i in layers:
        check_layer_head(net, i)
    store: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    try:
        for i in layers:
            blocks[i].attn.capture = store[i]
        yield store
    finally:
        for i in layers:
            blocks[i].attn.capture = None


@dataclass
class AttentionResult:
    """Attention of one image at one noise level, all layers."""

    probs: np.ndarray  # (L, H, N, N) float32; rows sum to 1
    image: np.ndarray  # (H_img, W_img, C) uint8, the clean image
    grid: int  # patches per side: N = grid * grid
    sigma: float
    label: int  # the condition given to the net (-1: none / null)

    @property
    def num_layers(self) -> int:
        return self.probs.shape[0]

    @property
    def num_heads(self) -> int:
        return self.probs.shape[1]


@torch.no_grad()
def attention_for_image(model, image: np.ndarray, label: Optional[int] = None, *, sigma: float = DEFAULT_ATTN_SIGMA,
                        seed: int = 0) -> AttentionResult:
    """Run the denoiser once on `image` (uint8 (H, W, C)) noised to `sigma` and capture every layer.

    `model` is a `ditkit.sampling.LoadedModel`. `label` None gives the null condition (class models).
    """
    net = model.net
    blocks = _blocks(net)
    c, h, w = model.image_shape
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape != (h, w, c) or img.dtype != np.uint8:
        raise DitkitError(f"attention image: expected uint8 ({h}, {w}, {c}), got {img.dtype} {img.shape}")
    dev = model.device
    x0 = torch.from_numpy(img).permute(2, 0, 1)[None].to(dev, torch.float32) / 127.5 - 1.0  # (1, C, H, W)
    x = x0 + sigma * ImageRNG([seed], dev).randn((c, h, w))  # sigma-space: x = x0 + sigma * eps
    nc = model.num_classes
    if nc > 0:
        lab = nc if label is None or label < 0 else int(label)  # nc = the null class
        cond = Condition.from_labels(torch.tensor([lab], device=dev), nc)
    else:
        cond = Condition.none(1)
    denoiser = model.objective.denoiser(net)
    with capture_attention(net) as store:
        denoiser(x, sigma, cond)
    probs = torch.stack([store[i][0][0] for i in range(len(blocks))]).float().cpu().numpy()  # (L, H, N, N)
    return AttentionResult(probs, img, int(round(probs.shape[-1] ** 0.5)), float(sigma),
                           -1 if nc == 0 or label is None else int(label))


def attention_map(probs: np.ndarray, query: Optional[int] = None, head: Optional[int] = None) -> np.ndarray:
    """One layer's probs (H, N, N) -> a (grid, grid) map over the keys.

    query: the attention of that query patch; None: the mean over all queries (where the image attends).
    head: that head; None: the mean over heads.
    """
    nh, n, _ = probs.shape
    if query is not None and not 0 <= query < n:
        raise DitkitError(f"query patch {query} does not exist: the image has {n} patches (0-{n - 1})")
    if head is not None and not 0 <= head < nh:
        raise DitkitError(f"attention head {head} does not exist: the layer has {nh} heads (0-{nh - 1})")
    p = probs if head is None else probs[head:head + 1]
    m = p.mean(axis=1) if query is None else p[:, query]  # (H', N)
    g = int(round(n ** 0.5))
    return m.mean(axis=0).reshape(g, g)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(g, g) -> (H, W), bilinear, so the map lies over the image pixel for pixel."""
    t = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def default_query(image: np.ndarray, grid: int) -> int:
    """The patch with the most contrast to the image's border colour: on a digit, a stroke patch."""
    img = image.astype(np.float32).mean(axis=-1)  # (H, W)
    background = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]))
    p = img.shape[0] // grid
    ink = np.abs(img - background).reshape(grid, p, grid, p).mean(axis=(1, 3))  # (g, g)
    # prefer central patches among equals: add a small bonus that decreases with distance to the centre
    yy, xx = np.mgrid[0:grid, 0:grid]
    ink = ink - 1e-3 * ((yy - (grid - 1) / 2) ** 2 + (xx - (grid - 1) / 2) ** 2)
    return int(np.argmax(ink))


def _draw(ax, image: np.ndarray, grid_map: Optional[np.ndarray], title: str, query: Optional[int], grid: int,
          highlight: bool = False) -> None:
    """The image in gray, the map (g, g) upsampled over it on its own colour scale, its peak written below
    (a uniform map peaks at 1/N: a diffuse head), the query patch outlined."""
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    shown = image[..., 0] if image.shape[-1] == 1 else image
    ax.imshow(shown, cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0), interpolation="nearest")
    if grid_map is not None:
        up = upsample(grid_map, (h, w))
        ax.imshow(up, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), vmin=0, vmax=max(float(up.max()), 1e-8))
        ax.set_xlabel(f"peak {grid_map.max():.2f}", fontsize=7, labelpad=1)
    if query is not None:
        p = h // grid
        r, c = divmod(query, grid)
        ax.add_patch(Rectangle((c * p, r * p), p, p, fill=False, edgecolor="#00e5ff", lw=1.5))
    ax.set_title(title, fontsize=8, color="#c00000" if highlight else "black", fontweight="bold" if highlight else "normal")
    ax.set_xticks([])
    ax.set_yticks([])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_attention(res: AttentionResult, layer: int, head: Optional[int], query: Optional[int], out: str | Path) -> Path:
    """attention.png for one layer: every head and the head mean, for the query patch and for all queries.

    Row 1: where query patch `query` (cyan square) attends. Row 2: the mean over queries. The chosen
    `head` is titled in red.
    """
    from matplotlib.figure import Figure

    if not 0 <= layer < res.num_layers:
        raise DitkitError(f"attention layer {layer} does not exist: the model has {res.num_layers} layers "
                          f"(0-{res.num_layers - 1}), {res.num_heads} heads each (0-{res.num_heads - 1})")
    if head is not None and not 0 <= head < res.num_heads:
        raise DitkitError(f"attention head {head} does not exist: the model has {res.num_layers} layers "
                          f"(0-{res.num_layers - 1}), {res.num_heads} heads each (0-{res.num_heads - 1})")
    if query is None:
        query = default_query(res.image, res.grid)
    probs = res.probs[layer]
    cols = res.num_heads + 2  # image, heads, mean
    fig = Figure(figsize=(1.5 * cols, 3.7), dpi=110)
    axes = fig.subplots(2, cols, squeeze=False)
    r, c = divmod(query, res.grid)
    rows = [(query, f"query patch {query} (row {r}, col {c})"), (None, "mean over queries")]
    for ri, (q, what) in enumerate(rows):
        _draw(axes[ri, 0], res.image, None, "image" if ri == 0 else "", query if ri == 0 else None, res.grid)
        axes[ri, 0].set_ylabel(what, fontsize=7)
        maps = [attention_map(probs, q, hd) for hd in range(res.num_heads)] + [attention_map(probs, q, None)]
        for hd, m in enumerate(maps):
            title = ("head mean" if hd == res.num_heads else f"head {hd}" + (" (chosen)" if hd == head else "")) \
                if ri == 0 else ""
            _draw(axes[ri, hd + 1], res.image, m, title, q, res.grid, highlight=hd == head)
    fig.suptitle(f"layer {layer}: attention at sigma={res.sigma:g}  (top: query patch {query}; bottom: mean over queries)",
                 fontsize=9)
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, _png(fig))
    return out


def plot_attention_layers(res: AttentionResult, query: Optional[int], out: str | Path) -> Path:
    """attention_layers.png: rows = layers, columns = heads + head mean, for query patch `query`
    (None: the mean over queries): how the attention pattern changes with depth."""
    from matplotlib.figure import Figure

    cols = res.num_heads + 1
    fig = Figure(figsize=(1.3 * cols, 1.5 * res.num_layers + 0.5), dpi=100)
    axes = fig.subplots(res.num_layers, cols, squeeze=False)
    for li in range(res.num_layers):
        maps = [attention_map(res.probs[li], query, hd if hd < res.num_heads else None) for hd in range(cols)]
        for hd, m in enumerate(maps):
            _draw(axes[li, hd], res.image, m, (f"head {hd}" if hd < res.num_heads else "mean") if li == 0 else "",
                  query, res.grid)
        axes[li, 0].set_ylabel(f"layer {li}", fontsize=8)
    what = f"query patch {query}" if query is not None else "mean over queries"
    fig.suptitle(f"attention by layer and head ({what}, sigma={res.sigma:g})", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, _png(fig))
    return out
