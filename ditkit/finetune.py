"""Fine-tuning a trained DiT on an image folder: full, with the first K blocks frozen, or LoRA (peft).

    ditkit finetune --from RUN_OR_CHECKPOINT --dataset FOLDER --out RUN [--mode full|freeze|lora]

The base run's network, objective and weights (EMA by default) are the start; the folder's classes are
matched to the base's by name, and classes the base never saw are appended to its label table:

    base table (K + 1, D): [class 0 .. class K-1, null]  ->  [class 0 .. class K-1, new 0 .. new n-1, null]

Each new row starts as a copy of the null row: the network's prediction for a label it knows nothing
about is then its unconditional one, which is what it has learned for "any image"; classifier-free
guidance of a new class starts at zero strength and grows as the row moves away (a mean of the class rows,
the other choice, is a label the network never saw in training, and guides towards an arbitrary blend of
the base's classes). A base without labels (unconditional) gets a zero table: its condition is then
exactly the base's, plus zero.

Then training is `ditkit train`'s loop (EMA, exact resume, metrics, grids, checkpoints) with a lower
learning rate and a shorter warm-up (FINETUNE_DEFAULTS), AdamW by default, on:
- full: every weight;
- freeze: the patch embedding and the first K blocks frozen (the early layers, as the tutorial does);
- lora: low-rank adapters (Hu et al. 2021) through peft on the blocks' matrices (`LORA_TARGETS`) and the
  label table (new rows must be learned whole); the adapter is also saved on its own, RUN/adapter
  (peft's adapter_config.json and adapter_model.safetensors, the label table, and the base's fingerprint),
  and `ditkit merge-lora` merges it into its base. Loading a LoRA run (sampling, eval, export) merges it.

Captions (`captions.jsonl` lines {"file": "A/x.png", "caption": "..."}, or a `.txt` beside an image) are
read, checked against the images and kept with the run (RUN/captions.jsonl); a class-conditional DiT is
conditioned by the class sub-folders, so captions do not change its training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from .data import DATASET_NAMES, ImageDataset, load_dataset
from .data.folder import IMAGE_SUFFIXES, _image_files, load_image
from .errors import DitkitError, UsageError

MODES = ("full", "freeze", "lora")
# --lr auto and --warmup-steps auto of a fine-tune: a tenth of `ditkit train`'s lr at batch 64 for the whole
# network (a trained model needs small steps: 2.8e-3 undoes it); with the first blocks frozen, what still
# trains must move further (measured on new classes in 2 minutes: 99% read as asked at 1e-3 against 90% at
# 3e-4, docs/BENCHMARKS.md); LoRA's usual larger lr for its fresh low-rank factors; a short warm-up (AdamW's
# moments settle in a few dozen steps)
FINETUNE_LR = {"full": 3e-4, "freeze": 1e-3, "lora": 2e-3}
FINETUNE_DEFAULTS = dict(warmup_steps=20, optimizer="adamw", weight_decay=0.0, guide_at=0.0)
# --lora-targets: names -> the regex (over the DiT's module names) peft wraps. Only the blocks: the patch
# embedding's conv is applied through its weight (layers.PatchEmbed), which a LoRA wrapper would not see.
LORA_TARGETS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2",
                "adaln": r"adaLN_modulation\.1"}
DEFAULT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "adaln")
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
ADAPTER_TABLE = "label_table.safetensors"
ADAPTER_INFO = "ditkit.json"
TABLE_KEY = "y_embedder.table.weight"


# -----------------------------------------------------------------------------------------------
# the image folder, strictly
# -----------------------------------------------------------------------------------------------
@dataclass
class Folder:
    """An image folder as fine-tuning reads it: images (N, C, S, S) uint8, labels (N,) into `class_names`,
    the files (relative to the root) and the captions by file."""

    root: Path
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    captions: dict[str, str] = field(default_factory=dict)


def read_folder(root: str | os.PathLike, image_size: int, channels: int) -> Folder:
    """Read `root/<class>/*.png|jpg` (classes) or `root/*.png|jpg` (one class named after the folder, or none
    for an unconditional base), strictly: every image readable and all of one size (resized to `image_size`
    if that differs), captions naming existing images. Each error names the file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DitkitError(f"--dataset {root}: no such folder")
    loose = _image_files(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_class = {d.name: _image_files(d) for d in class_dirs}
    by_class = {k: v for k, v in by_class.items() if v}
    if by_class and loose:
        raise DitkitError(f"--dataset {root}: images both in the folder ({loose[0].name}, ...) and in class "
                          f"sub-folders ({next(iter(by_class))}/); use one layout")
    if by_class:
        names = sorted(by_class)
        entries = [(p, i) for i, n in enumerate(names) for p in by_class[n]]
    else:
        names = [root.name]
        entries = [(p, 0) for p in loose]
    if not entries:
        raise DitkitError(f"--dataset {root}: no {'/'.join(IMAGE_SUFFIXES)} images in it or its sub-folders")
    sizes: dict[tuple[int, int], Path] = {}
    for path, _ in entries:
        try:
            with Image.open(path) as img:
                size = img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DitkitError(f"image file {path}: unreadable as PNG/JPEG ({e})") from None
        if size not in sizes:
            sizes[size] = path
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise DitkitError(f"image file {pb}: {b[0]}x{b[1]}, but {pa} is {a[0]}x{a[1]}; a fine-tuning folder "
                              "holds images of one size")
    images = np.empty((len(entries), channels, image_size, image_size), dtype=np.uint8)
    for i, (path, _) in enumerate(entries):
        images[i] = load_image(path, image_size, channels)  # names the file if decoding fails
    files = [p.relative_to(root).as_posix() for p, _ in entries]
    labels = np.array([label for _, label in entries], dtype=np.int64)
    return Folder(root, images, labels, names, files, read_captions(root, files))


def named_dataset(name: str, image_size: int, channels: int) -> Folder:
    """A dataset ditkit knows by name ("mnist") as a Folder: e.g. to fine-tune an MNIST model on MNIST itself
    with diffusers' timestep frequencies (--time-freq-shift 1), which makes it exportable."""
    data = load_dataset(name, image_size=image_size, channels=channels)
    return Folder(Path(name), data.images.numpy(), data.labels.numpy(), list(data.class_names), [], {})


def read_captions(root: Path, files: list[str]) -> dict[str, str]:
    """Captions by image file: root/captions.jsonl, and `.txt` files beside the images (which win)."""
    known = set(files)
    captions: dict[str, str] = {}
    path = root / "captions.jsonl"
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DitkitError(f"{path}, line {n}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str):
                raise DitkitError(f"{path}, line {n}: needs {{\"file\": \"...\", \"caption\": \"...\"}}")
            if rec["file"] not in known:
                raise DitkitError(f"{path}, line {n}: names {rec['file']!r}, which is not an image of the folder")
            captions[rec["file"]] = rec["caption"]
    for f in files:
        txt = (root / f).with_suffix(".txt")
        if txt.exists():
            captions[f] = txt.read_text().strip()
    return captions


# -----------------------------------------------------------------------------------------------
# the base model
# -----------------------------------------------------------------------------------------------
@dataclass
class Base:
    run_dir: Path
    checkpoint: Path
    config: dict[str, Any]  # the base run's config.json
    weights: dict[str, torch.Tensor]
    which: str  # "ema" or "model"

    @property
    def step(self) -> int:
        from .runs import read_state

        return int(read_state(self.checkpoint).get("step", 0))

    @property
    def class_names(self) -> list[str]:
        K = int(self.config["model"].get("num_classes", 0))
        return list(self.config.get("data", {}).get("class_names") or [str(i) for i in range(K)])


def load_base(path: str | os.PathLike, weights: str = "ema") -> Base:
    from .runs import load_weights, read_run_config, resolve_checkpoint

    run_dir, ck = resolve_checkpoint(path)
    config = read_run_config(run_dir, families=("dit",))
    sd = load_weights(ck, weights)
    if config.get("lora") is not None:  # a LoRA fine-tune as the base: start from its merged weights
        sd = merged_state_dict(config, sd)
        config = {k: v for k, v in config.items() if k != "lora"}
    return Base(run_dir, ck, config, sd, weights)


def fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and fp32 values, in name order: which weights an adapter was made on."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def grow_label_table(table: Optional[torch.Tensor], old_classes: int, new_classes: int, dim: int) -> torch.Tensor:
    """(K + 1, D) -> (K + n + 1, D): rows 0..K-1 kept, n new rows copied from the null row (see the module's
    docstring), the null row last. An unconditional base (table None) gets zeros."""
    if table is None:
        return torch.zeros(new_classes + 1, dim)
    null = table[old_classes:old_classes + 1]
    return torch.cat([table[:old_classes], null.expand(new_classes - old_classes, dim), null]).clone()


# -----------------------------------------------------------------------------------------------
# LoRA
# -----------------------------------------------------------------------------------------------
def lora_section(rank: int, alpha: float, targets: tuple[str, ...]) -> dict[str, Any]:
    if rank < 1:
        raise UsageError(f"--lora-rank {rank}: must be >= 1")
    if not alpha > 0:
        raise UsageError(f"--lora-alpha {alpha}: must be > 0")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise UsageError(f"--lora-targets {','.join(targets)}: allowed {', '.join(LORA_TARGETS)}")
    return {"rank": int(rank), "alpha": float(alpha), "targets": list(targets)}


def peft_config(section: dict[str, Any]):
    from peft import LoraConfig

    pattern = r"blocks\.\d+\.(" + "|".join(LORA_TARGETS[t] for t in section["targets"]) + ")"
    return LoraConfig(r=section["rank"], lora_alpha=section["alpha"], target_modules=pattern, lora_dropout=0.0)


def inject_lora(net: nn.Module, section: dict[str, Any]) -> nn.Module:
    """Wrap the targeted linear maps of `net` with LoRA adapters (in place; B starts at zero, so the network
    is unchanged until trained) and make only the adapters and the label table trainable."""
    from peft import inject_adapter_in_model

    net = inject_adapter_in_model(peft_config(section), net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name or name == TABLE_KEY)
    return net


def merged_state_dict(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA run's weights (base and adapters) -> the plain DiT's, W + (alpha / r) B A, merged by peft."""
    from .models import build_model

    net = inject_lora(build_model(config["model"], "dit"), config["lora"])
    net.load_state_dict(sd)
    return plain_weights(net)


def plain_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """Merge every LoRA layer of `net` into its base layer (peft's `merge`) and return the plain DiT's state dict."""
    from peft.tuners.lora import LoraLayer

    for m in net.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in net.state_dict().items()
            if "lora_" not in k}


def merge_lora_into(net: nn.Module, config: dict[str, Any]) -> nn.Module:
    """The plain DiT of a loaded LoRA run (runs.load_model calls this for configs with a "lora" section)."""
    from .models import build_model

    plain = build_model(config["model"], "dit")
    plain.load_state_dict(plain_weights(net))
    return plain


def save_adapter(run_dir: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Path:
    """RUN/adapter from a LoRA run's (EMA) weights: peft's adapter_config.json and adapter_model.safetensors,
    the label table, and ditkit.json (the base's fingerprint and the configs merge-lora needs). Atomic."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .models import build_model
    from .runs import _write_folder

    net = inject_lora(build_model(config["model"], "dit"), config["lora"])
    net.load_state_dict(weights)
    lora = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(net).items()}
    ft = config["finetune"]

    def write(tmp: Path) -> None:
        peft_config(config["lora"]).save_pretrained(str(tmp))
        save_file(lora, str(tmp / ADAPTER_WEIGHTS))
        if TABLE_KEY in weights:
            save_file({TABLE_KEY: weights[TABLE_KEY].contiguous()}, str(tmp / ADAPTER_TABLE))
        info = {"base_run": ft["base_run"], "base_checkpoint": ft["base_checkpoint"], "base_weights": ft["weights"],
                "base_sha256": ft["base_sha256"], "base_model": ft["base_model"], "model": config["model"],
                "lora": config["lora"], "objective": config["objective"], "data": config["data"]}
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    return _write_folder(Path(run_dir) / ADAPTER_DIR, write)


def merge_lora(adapter: str | os.PathLike, out: str | os.PathLike, base: Optional[str | os.PathLike] = None) -> Path:
    """`ditkit merge-lora`: a run folder `out` whose weights are `base` (default: the base the adapter records)
    with the adapter merged in. The base must be the one the adapter was trained on (its fingerprint)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .models import build_model
    from .runs import save_checkpoint
    from .utils import atomic_write_json

    adapter = Path(adapter)
    if (adapter / ADAPTER_DIR / ADAPTER_INFO).exists():  # the fine-tune run folder itself
        adapter = adapter / ADAPTER_DIR
    info_path = adapter / ADAPTER_INFO
    if not info_path.exists():
        raise DitkitError(f"--adapter {adapter}: not a ditkit LoRA adapter ({ADAPTER_INFO} is missing)")
    info = json.loads(info_path.read_text())
    b = load_base(base if base is not None else info["base_run"], info["base_weights"])
    if b.config["model"] != info["base_model"]:
        diff = sorted(k for k in set(b.config["model"]) | set(info["base_model"])
                      if b.config["model"].get(k) != info["base_model"].get(k))
        raise DitkitError(f"--adapter {adapter}: made for another base model (model fields differ: {', '.join(diff)})")
    got = fingerprint(b.weights)
    if got != info["base_sha256"]:
        raise DitkitError(f"--adapter {adapter}: made for other base weights (sha256 {info['base_sha256'][:12]}, "
                          f"{b.checkpoint} has {got[:12]}); give --base the run it was trained from")
    try:
        lora = load_file(str(adapter / ADAPTER_WEIGHTS))
        table = load_file(str(adapter / ADAPTER_TABLE)) if (adapter / ADAPTER_TABLE).exists() else {}
    except Exception as e:  # safetensors raises its own error types
        raise DitkitError(f"--adapter {adapter}: unreadable weights ({e})") from None
    sd = dict(b.weights)
    if table:
        sd[TABLE_KEY] = table[TABLE_KEY]
    net = build_model(info["model"], "dit")
    try:
        net.load_state_dict(sd)
        net = inject_lora(net, info["lora"])
        res = set_peft_model_state_dict(net, lora)
    except RuntimeError as e:
        raise DitkitError(f"--adapter {adapter}: does not fit the base model ({str(e)[:200]})") from None
    if getattr(res, "unexpected_keys", None):
        raise DitkitError(f"--adapter {adapter}: weights the model has no place for: {res.unexpected_keys[:3]}")
    merged = plain_weights(net)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: already exists and is not empty; pick a new folder")
    config = {k: v for k, v in json.loads((b.run_dir / "config.json").read_text()).items() if k != "lora"}
    config.update(model=info["model"], objective=info["objective"], data=info["data"],
                  merged_lora={"adapter": str(adapter.resolve()), "base_sha256": info["base_sha256"]})
    plain = build_model(info["model"], "dit")
    plain.load_state_dict(merged)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        atomic_write_json(tmp / "config.json", config)
        save_checkpoint(tmp, 0, plain, None, None, {"role": "merged-lora", "epoch": 0, "pos": 0}, {})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -----------------------------------------------------------------------------------------------
# the run
# -----------------------------------------------------------------------------------------------
@dataclass
class FinetuneStart:
    """What a fine-tune hands the training loop (`train.loop.train(cfg, start=...)`): the data, its labels in
    the grown table's ids; the run's config (the base's network and objective); and `prepare`, which puts the
    base's weights into the freshly built network and chooses what trains, before the EMA and the optimiser
    are made (on --resume the checkpoint's weights then replace them)."""

    base: Base
    data: ImageDataset
    model: dict[str, Any]  # the base's DiT config, its label table grown
    section: dict[str, Any]  # config.json["finetune"]
    lora: Optional[dict[str, Any]] = None  # config.json["lora"]
    folder: Optional[Folder] = None  # the images as read (their captions go beside the run)

    def run_config(self, cfg, data: ImageDataset) -> dict[str, Any]:
        from . import __version__

        C, H, W = data.image_shape
        K = self.model["num_classes"]
        config = {
            "ditkit_version": __version__, "family": "dit",
            "model_name": self.base.config.get("model_name", "DiT"), "model": self.model,
            "objective": self.base.config["objective"], "train": cfg.to_dict(),
            "data": {"name": data.name, "shape": [C, H, W], "num_classes": K,
                     "class_names": list(data.class_names) if K else [], "num_images": len(data),
                     "class_counts": torch.bincount(data.labels, minlength=K).tolist() if K else []},
            "finetune": self.section}
        if self.lora is not None:
            config["lora"] = self.lora
        return config

    def prepare(self, model: nn.Module) -> None:
        sd = dict(self.base.weights)
        old_K = int(self.base.config["model"].get("num_classes", 0))
        new_K = int(self.model["num_classes"])
        if new_K:
            sd[TABLE_KEY] = grow_label_table(sd.get(TABLE_KEY), old_K, new_K, int(self.model["hidden_size"]))
        model.load_state_dict(sd)
        k = int(self.section.get("freeze_blocks", 0))
        if k:  # the patch embedding and the first k blocks: the early layers
            for part in [model.x_embedder, *model.blocks[:k]]:
                part.requires_grad_(False)
        if self.lora is not None:
            inject_lora(model, self.lora)

    def trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_start(base: Base, dataset: str | os.PathLike, *, freeze_blocks: int = 0,
               lora: Optional[dict[str, Any]] = None, time_freq_shift: Optional[int] = None) -> FinetuneStart:
    """Read the folder against the base and decide the grown label table and what trains."""
    from .models.dit import DiTConfig

    if base.config.get("vae") is not None:
        raise UsageError(f"--from {base.run_dir}: a latent model (its images pass through a VAE); fine-tuning "
                         "reads pixel images, and encoding them is not supported")
    mcfg = dict(base.config["model"])
    depth = int(mcfg["depth"])
    if freeze_blocks and lora is not None:
        raise UsageError("--freeze-blocks and --lora: choose one (LoRA already leaves every base weight frozen)")
    if not 0 <= freeze_blocks <= depth:
        raise UsageError(f"--freeze-blocks {freeze_blocks}: the base has {depth} blocks (0 to {depth})")
    S, C = int(mcfg["input_size"]), int(mcfg["in_channels"])
    folder = named_dataset(str(dataset), S, C) if str(dataset) in DATASET_NAMES else read_folder(dataset, S, C)
    K = int(mcfg.get("num_classes", 0))
    base_names = base.class_names
    conditional = K > 0 or len(folder.class_names) > 1 or folder.root.name != folder.class_names[0]
    if not conditional:  # a flat folder and an unconditional base: fine-tune without labels
        names, labels = [], np.zeros(len(folder.labels), dtype=np.int64)
    else:
        names = list(base_names)
        for n in folder.class_names:
            if n not in names:
                names.append(n)
        ids = [names.index(n) for n in folder.class_names]
        labels = np.array([ids[i] for i in folder.labels], dtype=np.int64)
    new = [n for n in names if n not in base_names]
    mcfg["num_classes"] = len(names)
    if time_freq_shift is not None:
        mcfg["time_freq_shift"] = int(time_freq_shift)
    DiTConfig.from_dict(mcfg)  # refuses a bad --time-freq-shift by name
    data = ImageDataset(torch.from_numpy(folder.images), torch.from_numpy(labels), len(names), names,
                        name=folder.root.name)
    section = {"base_run": str(base.run_dir.resolve()), "base_checkpoint": str(base.checkpoint.resolve()),
               "base_step": base.step, "weights": base.which, "base_sha256": fingerprint(base.weights),
               "base_model": base.config["model"],
               "dataset": str(dataset) if str(dataset) in DATASET_NAMES else str(folder.root.resolve()),
               "mode": "lora" if lora is not None else ("freeze" if freeze_blocks else "full"),
               "freeze_blocks": int(freeze_blocks), "new_classes": new, "new_rows": "copies of the null row",
               "captions": len(folder.captions)}
    return FinetuneStart(base, data, mcfg, section, lora, folder)


def finetune(base: str | os.PathLike, dataset: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema",
             freeze_blocks: int = 0, lora: Optional[dict[str, Any]] = None, time_freq_shift: Optional[int] = None,
             **train_settings: Any) -> Path:
    """Fine-tune `base` (a run or checkpoint folder) on the image folder `dataset` into the new run `out`.
    `train_settings` are TrainConfig fields (max_minutes, max_steps, batch_size, lr, seed, ...); lr and
    warmup_steps default to the fine-tune's (FINETUNE_LR, FINETUNE_DEFAULTS)."""
    from .train.loop import train

    b = load_base(base, weights)
    start = plan_start(b, dataset, freeze_blocks=freeze_blocks, lora=lora, time_freq_shift=time_freq_shift)
    cfg = _train_config(b, start, out, train_settings)
    run = train(cfg, start=start)
    _finish(run, start)
    return run


def resume_finetune(out: str | os.PathLike, **train_settings: Any) -> Path:
    """Continue the fine-tune in `out` from its last checkpoint (exactly, as `ditkit train --resume`)."""
    from .runs import read_run_config
    from .train.config import TrainConfig
    from .train.loop import train

    config = read_run_config(out, families=("dit",))
    ft = config.get("finetune")
    if ft is None:
        raise DitkitError(f"--resume: {out} is not a fine-tune run (config.json has no 'finetune'); "
                          "resume it with ditkit train --resume")
    b = load_base(ft["base_checkpoint"], ft["weights"])
    if fingerprint(b.weights) != ft["base_sha256"]:
        raise DitkitError(f"--resume: the base weights in {ft['base_checkpoint']} changed since the fine-tune began")
    start = plan_start(b, ft["dataset"], freeze_blocks=ft["freeze_blocks"], lora=config.get("lora"),
                       time_freq_shift=config["model"].get("time_freq_shift"))
    cfg = replace(TrainConfig(), out=str(out), **{k: v for k, v in train_settings.items() if v is not None})
    run = train(cfg, resume=True, start=start)
    _finish(run, start)
    return run


def _train_config(b: Base, start: FinetuneStart, out, settings: dict[str, Any]):
    """`ditkit train`'s settings for the fine-tune: the base's own (its objective, EMA, precision ...), with the
    fine-tune's defaults (lower lr, short warm-up, AdamW, no guide model) and what was given."""
    from .train.config import TrainConfig

    recorded = TrainConfig.from_dict(b.config.get("train", {}))
    mode = start.section["mode"]
    C, S, _ = start.data.image_shape
    given = {k: v for k, v in settings.items() if v is not None}
    cfg = replace(recorded, out=str(out), dataset=str(start.section["dataset"]), image_size=S, channels=C,
                  subset=None, max_steps=None, epochs=None, max_minutes=None, batch_size=None,
                  lr=FINETUNE_LR[mode], **FINETUNE_DEFAULTS)
    cfg = replace(cfg, **given)
    if cfg.max_steps is None and cfg.epochs is None and cfg.max_minutes is None:
        cfg = replace(cfg, epochs=10.0)
    return cfg.validate()


def _finish(run: Path, start: FinetuneStart) -> None:
    """After training: the captions beside the run; a LoRA run's adapter on its own (from the EMA weights)."""
    from .runs import latest_checkpoint, load_weights, read_run_config

    folder = start.folder
    if folder is not None and folder.captions:
        from .utils import atomic_write_bytes

        atomic_write_bytes(Path(run) / "captions.jsonl", "".join(
            json.dumps({"file": f, "caption": c}) + "\n" for f, c in folder.captions.items()).encode())
    if start.lora is not None:
        ck = latest_checkpoint(run)
        if ck is not None:
            save_adapter(run, read_run_config(run), load_weights(ck, "ema"))
