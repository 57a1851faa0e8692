"""Small shared helpers: per-image randomness, atomic file writes, device choice."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import DitkitError, UsageError

# ---------------------------------------------------------------------------------------------
# Randomness: one seed per image (docs/DESIGN.md contract 3).
# ---------------------------------------------------------------------------------------------


def image_seeds(seed: int, num: int, start: int = 0) -> list[int]:
    """Seeds of images start..start+num-1 of a request with base `seed`.

    Image i always gets the same seed whatever batch it lands in; seeds are mixed through a
    64-bit hash so consecutive base seeds do not share images.
    """
    out = []
    for i in range(start, start + num):
        h = (seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
        h ^= h >> 31
        h = (h * 0xD6E8FEB86659FD93) & (2**64 - 1)
        h ^= h >> 32
        out.append(h & (2**63 - 1))
    return out


class ImageRNG:
    """A bank of torch generators, one per image of a batch.

    `randn(shape)` returns a (B, *shape) tensor whose row b is drawn from image b's generator only,
    so an image's noise (initial and per-step) never depends on its batch neighbours.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = []
        for s in self.seeds:
            g = torch.Generator(device="cpu")  # CPU generators: identical streams on every device
            g.manual_seed(s)
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = [torch.rand(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def subset(self, index: Iterable[int]) -> "ImageRNG":
        """A view over some images' generators (shares state: draws advance the originals)."""
        sub = ImageRNG([], self.device)
        for i in index:
            sub.seeds.append(self.seeds[i])
            sub.generators.append(self.generators[i])
        return sub


# ---------------------------------------------------------------------------------------------
# Atomic writes: write to a temp file in the same folder, fsync, rename.
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"--device {name!r}: allowed values are auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine (use auto or cpu)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run natively and faster than fp32: CUDA GPUs with bf16 support,
    and CPUs with bf16 instructions: AMX tiles (Intel Sapphire Rapids and later; oneDNN's bf16 GEMMs
    ~5x fp32 at DiT-T/4's shapes) or AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake; measured on a
    2-core Zen 4: a compiled DiT-T/4 training step at batch 64 1.5x, a batch-32 forward 1.25x faster)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        for probe in (getattr(getattr(torch._C, "_cpu", None), "_init_amx", None),
                      getattr(torch.cpu, "_is_avx512_bf16_supported", None)):
            if probe is None:
                continue
            try:
                if probe():
                    return True
            except Exception:
                continue
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where `native_bf16(device)`, else 'fp32'; 'fp32' and 'bf16' pass through."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--precision {precision!r}: allowed auto, fp32, bf16")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "mps":
        raise UsageError("--precision bf16: not supported on mps (use fp32)")
    return precision


def default_cache_dir() -> Path:
    """Where datasets and reference statistics are cached: $DITKIT_CACHE, else ~/.cache/ditkit."""
    env = os.environ.get("DITKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ditkit"


def compile_failed(error: Exception, instead: str) -> DitkitError:
    """The one-line error for a machine where torch.compile cannot build its kernels (inductor needs a
    C++ compiler on the CPU); `instead` says what to run instead."""
    return DitkitError(f"--compile: torch.compile failed on this machine ({type(error).__name__}: "
                       f"{first_line(error)}); it needs a working C++ compiler for the CPU: {instead}")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line (compiler errors run to pages), or its type's name if it has no text."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
