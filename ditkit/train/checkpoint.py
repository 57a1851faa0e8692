"""Checkpoint folders (DESIGN.md contract 4).

    RUN/config.json                      resolved configuration (model, objective, training, data, version)
    RUN/checkpoints/step_0000500/
        model.safetensors  ema.safetensors   weights
        optimizer.safetensors                the optimiser's state (moments, momenta), flattened
        state.json                           step, epoch, data position, optimizer groups, ...
        rng.safetensors                      generator states for bit-exact resume
    RUN/checkpoints/latest.json          {"step": 500, "path": "step_0000500"}
    RUN/guide/model.safetensors          the EMA weights early in the run, kept for autoguidance
    RUN/guide/state.json                 {"step": ..., "role": "guide"}

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into
place, then `latest.json` is replaced atomically: a `kill -9` at any moment leaves either the old or
the new checkpoint, never a half one. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import DitkitError
from ..utils import _fsync_dir, atomic_write_json

CKPT_DIR = "checkpoints"
GUIDE_DIR = "guide"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    flat = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            flat[f"{idx}.{name}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return flat, sd["param_groups"]


def _optimizer_from_flat(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_folder(final: Path, write) -> Path:
    """Create folder `final` atomically: `write(tmp)` fills a hidden temporary sibling, every file and the
    folder are fsync'ed, then it is renamed into place (replacing an older `final`)."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_dir(tmp)
    if final.exists():  # a re-save (e.g. Ctrl-C right after a periodic save of the same step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, ema_model: Optional[nn.Module],
                    optimizer: Optional[torch.optim.Optimizer], state: dict[str, Any],
                    rng: dict[str, torch.Tensor], keep: int = 0) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` checkpoints (0 = keep all)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"

    def write(tmp: Path) -> None:
        _save_tensors(model.state_dict(), tmp / "model.safetensors")
        if ema_model is not None:
            _save_tensors(ema_model.state_dict(), tmp / "ema.safetensors")
        st = dict(state)
        if optimizer is not None:
            flat, groups = _optimizer_to_flat(optimizer)
            _save_tensors(flat or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
            st["optimizer_param_groups"] = groups
        if rng:
            _save_tensors(rng, tmp / "rng.safetensors")
        st["step"] = step
        atomic_write_json(tmp / "state.json", st)

    final = _write_folder(root / name, write)
    atomic_write_json(root / "latest.json", {"step": step, "path": name})
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_guide(run_dir: Path, step: int, ema_model: nn.Module) -> Path:
    """Keep the EMA weights of step `step` as the run's weak model for autoguidance (atomically)."""
    def write(tmp: Path) -> None:
        _save_tensors(ema_model.state_dict(), tmp / "model.safetensors")
        atomic_write_json(tmp / "state.json", {"step": step, "role": "guide"})

    return _write_folder(Path(run_dir) / GUIDE_DIR, write)


def guide_checkpoint(run_dir: Path) -> Optional[Path]:
    """The run's guide folder, or None if it was not saved (yet)."""
    p = Path(run_dir) / GUIDE_DIR
    return p if (p / "state.json").exists() and (p / "model.safetensors").exists() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary leftovers are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").exists()]
    return sorted(out, key=lambda p: p.name)


def clean_partial(run_dir: Path) -> None:
    """Remove temporary folders left by a checkpoint write that was killed."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(f".tmp-{GUIDE_DIR}-*"):
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest.json"
    if pointer.exists():
        try:
            p = root / json.loads(pointer.read_text())["path"]
            if (p / "state.json").exists():
                return p
        except (ValueError, KeyError):
            pass
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run folder or a checkpoint folder; clear errors otherwise."""
    p = Path(path)
    if not p.exists():
        raise DitkitError(f"--ckpt {p}: no such folder (give a run folder made by `ditkit train`)")
    if (p / "state.json").exists() and (p / "model.safetensors").exists():
        return (p.parent if p.name == GUIDE_DIR else p.parent.parent), p
    if not (p / "config.json").exists():
        raise DitkitError(f"--ckpt {p}: not a ditkit run folder (config.json is missing)")
    ck = latest_checkpoint(p)
    if ck is None:
        raise DitkitError(f"--ckpt {p}: the run has no checkpoint yet (nothing under {p / CKPT_DIR})")
    return p, ck


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise DitkitError(f"checkpoint {ckpt}: unreadable state.json ({e})") from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Weights of a checkpoint: `ema` (default; falls back to `model` when no EMA was kept) or `model`."""
    if which not in ("ema", "model"):
        raise DitkitError(f"weights {which!r}: allowed ema, model")
    f = ckpt / f"{which}.safetensors"
    if which == "ema" and not f.exists():
        f = ckpt / "model.safetensors"
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DitkitError(f"checkpoint {ckpt}: cannot read {f.name} ({e})") from None


def load_training_state(ckpt: Path, model: nn.Module, ema_model: Optional[nn.Module],
                        optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = read_state(ckpt)
    model.load_state_dict(load_weights(ckpt, "model"))
    if ema_model is not None and (ckpt / "ema.safetensors").exists():
        ema_model.load_state_dict(load_weights(ckpt, "ema"))
    if optimizer is not None and (ckpt / "optimizer.safetensors").exists():
        flat = load_file(str(ckpt / "optimizer.safetensors"))
        flat.pop("_empty", None)
        _optimizer_from_flat(optimizer, flat, state["optimizer_param_groups"])
    rng = load_file(str(ckpt / "rng.safetensors")) if (ckpt / "rng.safetensors").exists() else {}
    return state, rng
