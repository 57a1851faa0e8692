"""One in-memory dataset type for everything ditkit trains on, and `load_dataset` to make it.

Images stay uint8 in memory (60k MNIST digits are 47 MB) and become float32 in [-1, 1] only per
batch, which is the range every objective in ditkit expects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DitkitError, UsageError
from .folder import load_image_folder
from .mnist import NUM_CLASSES as MNIST_NUM_CLASSES
from .mnist import SPLITS, load_mnist

DATASET_NAMES = ("mnist",)


@dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64, all in memory.

    `num_classes` is 0 for an unconditional dataset (labels are then all 0 and carry nothing).
    """

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = ""
    captions: list[str] = field(default_factory=list)  # one per image for text-to-image training, else empty

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UsageError(f"ImageDataset.images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise UsageError(
                f"ImageDataset.labels must be ({self.images.shape[0]},) int64, got {tuple(self.labels.shape)} {self.labels.dtype}"
            )
        if self.num_classes < 0 or len(self.class_names) not in (0, self.num_classes):
            raise UsageError(f"ImageDataset: num_classes={self.num_classes} but {len(self.class_names)} class names")
        if len(self.captions) not in (0, self.images.shape[0]):
            raise UsageError(f"ImageDataset: {len(self.captions)} captions for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, n: int) -> "ImageDataset":
        """The first `n` images (all of them if there are fewer)."""
        return ImageDataset(self.images[:n], self.labels[:n], self.num_classes, list(self.class_names),
                            f"{self.name}[:{n}]" if n < len(self) else self.name, self.captions[:n])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `index` as float32 in [-1, 1], (B, C, H, W), and their labels (B,) int64."""
        return to_model_range(self.images[index].to(torch.float32)), self.labels[index]

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` of `n` images drawn uniformly with replacement, in the order of their labels (a stable
        target's references: `objectives.base.stable_target_x0` then finds each class's without a sort)."""
        index = torch.randint(len(self), (n,), generator=generator)
        return self.batch(index[torch.argsort(self.labels[index], stable=True)])

    def mean_image(self, chunk: int = 8192) -> torch.Tensor:
        """The per-pixel mean of all the images in the range `batch` gives, (C, H, W) float64."""
        total = torch.zeros(self.image_shape, dtype=torch.float64)
        for i in range(0, len(self), chunk):  # float64 sums in chunks: no N x C x H x W float copy
            total += self.images[i:i + chunk].to(torch.float64).sum(0)
        return to_model_range(total / max(len(self), 1))  # the map is affine: the mean of the map is the map of the mean


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 (a float tensor) to the models' range: 0 -> -1, 255 -> 1."""
    return pixels / 127.5 - 1.0


def _resize_uint8(images: np.ndarray, image_size: int, chunk: int = 8192) -> np.ndarray:
    """(N, C, H, W) uint8 → (N, C, S, S) uint8, bilinear with antialiasing, in chunks to bound memory."""
    out = np.empty((*images.shape[:2], image_size, image_size), dtype=np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).to(torch.float32)
        y = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def load_dataset(
    name_or_path: str,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Load a dataset by name ("mnist") or from an image folder path.

    - "mnist": 1×28×28 digits, 10 classes, split "train" (60k) or "test" (10k). If `image_size` is
      given and differs from 28 the digits are resized with `torch.nn.functional.interpolate`
      (bilinear, antialias=True) and rounded back to uint8. `channels=3` repeats the gray channel.
      A local folder literally named `mnist` can be reached as `./mnist`.
    - anything else: an image folder (see `load_image_folder`); `image_size` is required and
      `channels` defaults to 3. A folder has no splits: it serves every split whole.
    """
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: allowed values are {', '.join(SPLITS)}")
    if channels is not None and channels not in (1, 3):
        raise UsageError(f"channels={channels}: allowed values are 1 (grayscale) or 3 (RGB)")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise UsageError(f"image_size={image_size}: must be a positive integer")

    if name_or_path in DATASET_NAMES:
        x, y = load_mnist(split, cache_dir=cache_dir)  # (N, 28, 28) uint8, (N,) int64
        images = x[:, None]  # (N, 1, 28, 28)
        if image_size is not None and image_size != images.shape[-1]:
            images = _resize_uint8(images, int(image_size))
        if channels == 3:
            images = np.repeat(images, 3, axis=1)  # (N, 3, S, S)
        return ImageDataset(
            images=torch.from_numpy(np.ascontiguousarray(images)),
            labels=torch.from_numpy(y),
            num_classes=MNIST_NUM_CLASSES,
            class_names=[str(d) for d in range(MNIST_NUM_CLASSES)],
            name=f"mnist-{split}",
        )

    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        raise DitkitError(
            f"dataset {name_or_path!r}: unknown; allowed values are {', '.join(DATASET_NAMES)} "
            "or the path of an existing image folder"
        )
    if image_size is None:
        raise UsageError(f"dataset {name_or_path!r}: an image folder needs image_size (e.g. 32)")
    images, labels, class_names = load_image_folder(root, int(image_size), 3 if channels is None else channels)
    return ImageDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_classes=len(class_names),
        class_names=class_names,
        name=root.name,
    )
