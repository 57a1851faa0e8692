"""Pictures as files: image grids and matplotlib figures written as PNG, atomically (a killed process leaves
the old file or the new one, never half of one). The lowest layer that draws: training, sampling, the
report and the server all write their pictures through here."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .utils import atomic_write_bytes


def make_grid(images: np.ndarray, nrow: Optional[int] = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (H', W', C) picture, `nrow` images per row, `pad` px of black between."""
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, C) picture as PNG file bytes."""
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[..., 0]
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: np.ndarray, path: str | Path, nrow: Optional[int] = None, scale: int = 2) -> Path:
    """uint8 (N, H, W, C) images as one PNG grid at `path`."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(make_grid(images, nrow=nrow, scale=scale)))
    return path


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (no half-written picture if the run is killed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
