"""Datasets: MNIST (offline after one fetch) and folders of PNG/JPEG images, as uint8 in memory."""

from .dataset import DATASET_NAMES, ImageDataset, load_dataset
from .folder import load_image_folder
from .mnist import ensure_mnist, load_mnist, mnist_cache_path, read_idx, write_idx

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "ensure_mnist",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "mnist_cache_path",
    "read_idx",
    "write_idx",
]
