"""A folder of PNG/JPEG images as one in-memory uint8 array.

Layouts:
- `root/<class_name>/*.png|jpg|jpeg`: class-conditional; class ids follow the sorted sub-folder names.
- `root/*.png|jpg|jpeg`: unconditional (no class names, every label 0).

Every image is resized so its shorter side is `image_size` (bicubic, which PIL antialiases when
downsampling) and centre-cropped to `image_size`×`image_size`, in 'L' (1 channel) or 'RGB' (3).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DitkitError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHANNEL_MODES = {1: "L", 3: "RGB"}


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files skipped), any suffix case."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def resize_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Scale the shorter side to `image_size` (bicubic), then cut the centred square."""
    w, h = img.size
    scale = image_size / min(w, h)
    # max(…, image_size): rounding must never leave the longer side short of the crop.
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file → (C, H, W) uint8. Raises `DitkitError` naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            img = ImageOps.exif_transpose(img)  # honour camera orientation tags (JPEG)
            # Convert before resizing: palette ('P') images would otherwise be resized by nearest.
            img = img.convert(CHANNEL_MODES[channels])
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DitkitError(f"image file {path}: unreadable as PNG/JPEG ({e})") from None
    arr = np.asarray(resize_center_crop(img, image_size), dtype=np.uint8)  # (H, W) or (H, W, 3)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | os.PathLike, image_size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load every image under `root`.

    Returns images (N, C, H, W) uint8 with H = W = `image_size`, labels (N,) int64 and the class
    names (empty for an unconditional folder, where every label is 0).
    """
    if channels not in CHANNEL_MODES:
        raise UsageError(f"channels={channels}: allowed values are 1 (grayscale) or 3 (RGB)")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise UsageError(f"image_size={image_size}: must be a positive integer")
    image_size = int(image_size)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DitkitError(f"image folder {root}: no such folder")

    loose = _image_files(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _image_files(d) for d in class_dirs}
    for name in [n for n, files in class_files.items() if not files]:
        log.warning("image folder %s: sub-folder %s holds no PNG/JPEG images, skipped", root, name)
        del class_files[name]

    if class_files and loose:
        raise DitkitError(
            f"image folder {root}: has both images in the root and class sub-folders; "
            "use either root/<class>/*.png (conditional) or root/*.png (unconditional)"
        )
    if class_files:
        class_names = sorted(class_files)
        entries = [(p, label) for label, name in enumerate(class_names) for p in class_files[name]]
    else:
        class_names = []
        entries = [(p, 0) for p in loose]
    if not entries:
        raise DitkitError(f"image folder {root}: no {'/'.join(IMAGE_SUFFIXES)} images in it or its sub-folders")

    images = np.empty((len(entries), channels, image_size, image_size), dtype=np.uint8)  # (N, C, H, W)
    labels = np.empty(len(entries), dtype=np.int64)  # (N,)
    for i, (path, label) in enumerate(entries):
        images[i] = load_image(path, image_size, channels)
        labels[i] = label
    log.info("image folder %s: %d images, %d classes, %dx%dx%d", root, len(entries),
             len(class_names), channels, image_size, image_size)
    return images, labels, class_names
