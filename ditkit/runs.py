"""Run folders: everything that reads or writes one (docs/DESIGN.md, "Run folder"). Training, sampling,
evaluation, the report and the server all read runs through this module.

    RUN/config.json                      resolved configuration (family, model, objective, train, data, version)
    RUN/checkpoints/step_0000500/
        model.safetensors  ema.safetensors   weights
        optimizer.safetensors                the optimiser's state (moments, momenta), flattened
        state.json                           step, epoch, data position, optimizer groups, ...
        rng.safetensors                      generator states for bit-exact resume
    RUN/checkpoints/latest.json          {"step": 500, "path": "step_0000500"}
    RUN/guide/model.safetensors          the EMA weights early in the run, kept for autoguidance
    RUN/guide/state.json                 {"step": ..., "role": "guide"}
    RUN/metrics.jsonl                    one JSON line per logged step

A checkpoint is written into a hidden temporary folder, every file fsync'ed, then renamed into
place, then `latest.json` is replaced atomically: a `kill -9` at any moment leaves either the old or
the new checkpoint, never a half one. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations



import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .errors import DitkitError, UsageError
from .models import build_model
from .models.registry import check_config_dict, get_family
from .objectives import build_objective
from .utils import _fsync_dir, atomic_write_json, compile_failed, pick_device


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


def save_guide(run_dir: Path, step: int, ema: nn.Module | dict[str, torch.Tensor]) -> Path:
    """Keep the EMA weights of step `step` (a module or its state dict) as the run's weak model for
    autoguidance (atomically)."""
    weights = ema.state_dict() if isinstance(ema, nn.Module) else ema

    def write(tmp: Path) -> None:
        _save_tensors(weights, tmp / "model.safetensors")
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


# -----------------------------------------------------------------------------------------------
# config.json, read through one schema
# -----------------------------------------------------------------------------------------------
# the top-level sections of config.json and the JSON type each must have
RUN_SECTIONS: dict[str, type] = {"model": dict, "objective": dict, "train": dict, "data": dict}


def read_run_config(run_dir: str | os.PathLike, families: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """The run's config.json, checked: a JSON object whose sections have the right types, a known model
    family, and a model config that the family accepts (each error names the field). With `families`, a
    run of another family is refused."""
    run_dir = Path(run_dir)
    where = f"{run_dir}/config.json"
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DitkitError(f"{where}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise DitkitError(f"{where}: must be a JSON object, got a JSON {type(cfg).__name__}")
    for key, typ in RUN_SECTIONS.items():
        if key in cfg and not isinstance(cfg[key], typ):
            raise DitkitError(f"{where}: {key!r} must be a JSON object, got {type(cfg[key]).__name__}")
    for key in ("model", "objective"):
        if key not in cfg:
            raise DitkitError(f"{where}: missing {key!r}")
    family = cfg.get("family", "dit")
    if not isinstance(family, str):
        raise DitkitError(f"{where}: 'family' must be a string, got {type(family).__name__}")
    try:
        fam = get_family(family)
        build_config = fam.config_cls.from_dict
        build_config(check_config_dict(fam.config_cls, cfg["model"], "model"))
    except UsageError as e:
        raise DitkitError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the right type but out of range for the network
        raise DitkitError(f"{where}: model: {e}") from None
    if families is not None and family not in families:
        raise DitkitError(f"{run_dir}: a {family!r} run; this needs a run of family {' or '.join(families)}")
    return cfg


# -----------------------------------------------------------------------------------------------
# loading a trained model
# -----------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A trained network with its objective and resolved config, ready to sample."""

    net: nn.Module
    objective: Any
    config: dict[str, Any]
    run_dir: Optional[Path] = None
    checkpoint: Optional[Path] = None
    step: int = 0
    guide: Optional["LoadedModel"] = None  # the weak model for autoguidance (the run's own by default)
    text_encoder: Any = None  # the frozen prompt encoder of a text-conditioned run (config.json "text")
    decoder: Any = None  # a latent run's VAE decoder, latents -> images (config.json "vae"; ditkit.interop)
    quantize: str = "none"  # "int8" where the network's token maps run in INT8 (ditkit.quantize)

    @property
    def family(self) -> str:
        return str(self.config.get("family", "dit"))

    @property
    def model_config(self) -> Any:
        return self.net.config

    @property
    def num_classes(self) -> int:
        return int(self.net.config.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.net.config
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def class_counts(self) -> Optional[list[int]]:
        """How many training images each class had (the run's label prior), or None if the run did not record it."""
        counts = self.config.get("data", {}).get("class_counts")
        return [int(c) for c in counts] if counts else None

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("data", {}).get("class_names") or [str(i) for i in range(self.num_classes)])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def precision(self) -> str:
        return "bf16" if next(self.net.parameters()).dtype == torch.bfloat16 else "fp32"

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.net, "compiled", False))


def load_model(ckpt: str | os.PathLike, *, weights: str = "ema", device: str = "auto",
               guide: str | os.PathLike | None = None, precision: str = "fp32", compile: bool = False,
               quantize: str = "none") -> LoadedModel:
    """Load a run folder (its latest checkpoint) or one checkpoint folder; EMA weights by default.

    guide: the weak model for autoguidance: a run or checkpoint folder (e.g. an early checkpoint of the
    same run, or a smaller model of the same data); None = the run's own `guide/` when it has one.
    precision: the network's weights and arithmetic, "fp32" or "bf16" (the sampler's state stays fp32).
    bf16 doubles batched throughput on CPUs with bf16 matrix units but is slower for one image; each
    precision keeps "one seed, one image" bit for bit, but the two give (slightly) different images.
    compile: run the network through `torch.compile` (see `DiT.compile_for_inference`): 10-25% faster
    on the CPU, after ~25 s of compilation here, done now; its images are its own, like a precision's.
    The weak model of autoguidance stays eager.
    quantize: "int8" runs the per-token linear maps (of the weak model's too) in INT8 (`ditkit.quantize`);
    on a device or CPU without INT8 kernels the model stays fp32 and a warning says so.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    from .quantize import apply_quantize, check_quantize

    if check_quantize(quantize) == "int8" and (compile or precision != "fp32"):
        raise UsageError("--quantize int8: quantises the fp32 network for eager inference; drop "
                         + ("--compile" if compile else f"--precision {precision}") + " (or --quantize)")
    run_dir, ck = resolve_checkpoint(ckpt)
    main = _load_one(run_dir, ck, weights, device, precision)
    if guide is not None:
        g_run, g_ck = resolve_checkpoint(guide)
        main.guide = _load_one(g_run, g_ck, "ema", device, precision)
        _check_guide(main, main.guide, str(guide))
    elif (own := guide_checkpoint(run_dir)) is not None and int(read_state(own).get("step", 0)) < main.step:
        main.guide = _load_one(run_dir, own, "ema", device, precision)  # only an earlier guide is weaker
    for m in (main, main.guide) if main.guide is not None else (main,):
        m.quantize = apply_quantize(m.net, quantize, m.device)
    if compile:
        compile_model(main)
    return main


def compile_model(model: LoadedModel) -> None:
    """Compile the model's network for inference now, so that the first request does not pay for it;
    a clear error if this machine cannot compile."""
    net = model.net
    if not hasattr(net, "compile_for_inference"):
        raise UsageError(f"--compile: {type(net).__name__} networks have no compiled inference path")
    try:
        net.compile_for_inference()
    except UsageError:
        raise
    except Exception as e:  # inductor: no C++ compiler, an unsupported platform, ...
        raise compile_failed(e, "run without --compile") from None


def _load_one(run_dir: Path, ck: Path, weights: str, device: str, precision: str = "fp32") -> LoadedModel:
    cfg = read_run_config(run_dir)
    fam = get_family(cfg.get("family", "dit"))
    if not fam.sampleable:
        raise DitkitError(f"{run_dir}: a {fam.name!r} run ({fam.description or 'not a generator'}); "
                          "give the run folder of a model that draws images")
    net = build_model(cfg["model"], fam.name)
    if cfg.get("lora") is not None:  # a LoRA fine-tune: its checkpoints hold the base and the adapters
        from .finetune import inject_lora

        inject_lora(net, cfg["lora"])
    try:
        objective = build_objective(cfg["objective"])
    except TypeError as e:  # an objective field this ditkit does not know
        raise DitkitError(f"{run_dir}/config.json: objective: {e}") from None
    try:
        net.load_state_dict(load_weights(ck, weights))
    except RuntimeError as e:
        raise DitkitError(f"checkpoint {ck}: weights do not match the model in config.json ({str(e)[:200]})") from None
    if cfg.get("lora") is not None:
        from .finetune import merge_lora_into

        net = merge_lora_into(net, cfg)  # one plain DiT to sample from
    dev = pick_device(device)
    net.to(dev, PRECISIONS[precision]).eval().requires_grad_(False)
    if hasattr(objective, "attach"):  # an objective with parts of its own to load (a tokenizer, ...)
        objective.attach(run_dir, dev)
    model = LoadedModel(net, objective, cfg, run_dir, ck, int(read_state(ck).get("step", 0)))
    if cfg.get("text") is not None:
        from .text import load_text_encoder

        model.text_encoder = load_text_encoder(cfg["text"])
    if cfg.get("vae") is not None:
        from .interop.diffusers import LatentDecoder

        model.decoder = LatentDecoder(run_dir, cfg["vae"], dev)
    return model


def _check_guide(model: LoadedModel, guide: LoadedModel, where: str) -> None:
    """A weak model must draw the same kind of images, under the same conditions and noise levels."""
    problems = []
    if guide.image_shape != model.image_shape:
        problems.append(f"images {guide.image_shape} vs {model.image_shape}")
    if guide.num_classes != model.num_classes:
        problems.append(f"{guide.num_classes} classes vs {model.num_classes}")
    go, mo = guide.objective.config(), model.objective.config()
    if go["name"] != mo["name"]:
        problems.append(f"objective {go['name']!r} vs {mo['name']!r}")
    if problems:
        raise UsageError(f"--guide {where}: not a weak version of this model ({'; '.join(problems)})")


# -----------------------------------------------------------------------------------------------
# the run's own sampling setting (`ditkit tune`)
# -----------------------------------------------------------------------------------------------
TUNED_FILE = "sampling.json"  # {"settings": SamplingSettings.to_dict(), "figures": {...}, "step": ..., ...}


def read_tuned_setting(run_dir: str | os.PathLike) -> Any:
    """The SamplingSettings the run chose for itself (RUN/sampling.json), or None where it has none (an older
    run, or one not tuned yet). A corrupt or hand-edited file is a DitkitError naming the field."""
    from .settings import SamplingSettings

    path = Path(run_dir) / TUNED_FILE
    if not path.exists():
        return None
    where = str(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DitkitError(f"{where}: unreadable ({e}); delete it or run `ditkit tune {run_dir}` again") from None
    if not isinstance(doc, dict) or "settings" not in doc:
        raise DitkitError(f"{where}: must be a JSON object with a 'settings' object; delete it or run "
                          f"`ditkit tune {run_dir}` again")
    try:
        return SamplingSettings.from_dict(doc["settings"], where=f"{where}: settings")
    except UsageError as e:
        raise DitkitError(f"{where}: {e}") from None


def write_tuned_setting(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Keep `record` ({"settings": ..., "figures": ..., ...}) as the run's tuned setting, atomically."""
    path = Path(run_dir) / TUNED_FILE
    atomic_write_json(path, record)
    return path
