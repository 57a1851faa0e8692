"""Image grids as PNG files: they live in `ditkit.images` (training writes its grids too); the names stay
importable from here."""

from __future__ import annotations

from ..images import make_grid, png_bytes, save_grid

__all__ = ["make_grid", "png_bytes", "save_grid"]
