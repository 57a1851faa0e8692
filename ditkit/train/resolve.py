"""Resolving a training run before its first step: the settings (what each "auto" becomes, and, on
--resume, the run's recorded ones), the data, the device, the run's config.json and whether it compiles.

Nothing here writes into a run folder (except that --resume clears a half-written checkpoint): every
setting is checked first, so a refused run leaves nothing behind that would block a retry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..condition import Condition
from ..data import load_dataset
from ..errors import DitkitError, UsageError
from ..models import DiTConfig, build_model, model_config
from ..models.registry import get_family, preset_family
from ..objectives import DataMean, build_objective
from ..runs import clean_partial, latest_checkpoint, read_run_config
from ..utils import compile_failed, pick_device, resolve_precision
from .config import TrainConfig
from .optim import DEFAULT_WEIGHT_DECAY, build_optimizer

log = logging.getLogger(__name__)

# --compile auto (the default) compiles a run on the CPU that is at least this long: compiling costs ~35 s
# here and then buys ~24% more steps per second, so it pays for itself after ~2.5 minutes of training.
AUTO_COMPILE_MIN_MINUTES = 3.0
AUTO_COMPILE_MIN_STEPS = 3000
# ... but not on a CPU whose widest vectors are AVX2: there a compiled step was measured no faster than an
# eager one (fp32, batch 64: 154 against 155 img/s, and 167 against 170 in a second pair), while a first
# compilation (empty inductor cache) cost ~50 s, 8% of a 10-minute run (docs/BENCHMARKS.md).
AUTO_COMPILE_SKIP_CPUS = ("AVX2",)
# --batch-size auto (the default) is 64, with lr 2.8e-3: better per CPU-minute than 32 where a 10-minute run
# makes 5,000+ steps (docs/history/BENCHMARKS-rounds.md). A run limited by time alone first measures a
# training step here at each of these batches, and takes the first one at which its budget buys at least
# AUTO_BATCH_MIN_STEPS steps (else the last): on a host that made ~1,600 steps at 64 in 10 minutes, batch
# 32's ~2,700 were better in two pairs of two (~3.3x the FID floor against ~4.0x), and batch 16's ~4,500
# worse (5.4x). 3,000 lies between 1,600 (32 better) and 6,100 (64 better).
AUTO_BATCHES = (64, 32)
AUTO_BATCH_MIN_STEPS = 3000
PROBE_WARMUP, PROBE_STEPS = 2, 3  # untimed, then timed, training steps of the measurement at each batch
BASE_BATCH, BASE_LR = 64, 2.8e-3  # --lr auto: BASE_LR at BASE_BATCH, scaled by sqrt(batch / BASE_BATCH)
# config["data"] keys that runs of an older ditkit lack: such a run resumes, and records them from then on
DATA_KEYS_ADDED_LATER = ("class_counts",)


@dataclass
class ResolvedRun:
    """Everything a run is before its first step. `cfg` has every auto setting resolved; `config` is what
    RUN/config.json holds; `checkpoint` is where a resumed run goes on from (None: a new run)."""

    cfg: TrainConfig
    config: dict[str, Any]
    data: Any  # ditkit.data.ImageDataset
    device: torch.device
    run_dir: Path
    steps_per_epoch: int
    measured_s: float  # spent measuring --batch-size auto: it counts against --max-minutes
    resumed: bool = False
    checkpoint: Optional[Path] = None
    start: Any = None  # a fine-tune's start (ditkit.finetune.FinetuneStart): its data, config and base weights

    @property
    def total_steps(self) -> Optional[int]:
        """The step limit (--max-steps, --epochs: the first reached), None with a time limit alone."""
        limits = [n for n in (self.cfg.max_steps,
                              math.ceil(self.cfg.epochs * self.steps_per_epoch) if self.cfg.epochs is not None else None)
                  if n is not None]
        return min(limits) if limits else None


def resolve_run(cfg: TrainConfig, *, resume: bool, dist, start: Any = None) -> ResolvedRun:
    """Check and resolve everything about the run in `cfg.out` before anything is written. With `resume`,
    the fields of `cfg` left at their defaults take the run's recorded values. A fine-tune's `start` gives
    the data (`start.data`) and the run's config (`start.run_config(cfg, data)`) instead of `cfg`."""
    run_dir = Path(cfg.out)
    old = _recorded_config(run_dir) if resume else None
    if old is not None:
        cfg = replace(cfg).settings_of_run(TrainConfig.recorded(old["train"]))
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.device if dist.world_size > 1 else pick_device(cfg.device)
    if start is not None:
        data = start.data
    elif cfg.captions is not None:  # text to image: images with one caption each
        from ..text.captions import captioned_dataset
        data = captioned_dataset(cfg.captions, cfg.dataset, cfg.image_size, cfg.channels)
    else:
        data = load_dataset(cfg.dataset, image_size=cfg.image_size, channels=cfg.channels)
    if cfg.subset is not None:
        data = data.subset(cfg.subset)
    cfg = replace(cfg, stable_target=cfg.stable_target_refs())  # what auto became is written into the run
    config = start.run_config(cfg, data) if start is not None else resolve_run_config(cfg, data)
    config["world_size"] = dist.world_size
    config["precision"] = resolve_precision(cfg.precision, device)  # what "auto" became on this machine
    if old is None and (run_dir / "config.json").exists():
        raise DitkitError(f"--out {run_dir} already holds a run; add --resume to continue it or pick another --out")
    t_measure = time.monotonic()  # measuring the batch counts against a time budget: the run's clock starts here
    cfg = resolve_auto_settings(cfg, config, device, dist.world_size, len(data))
    config["train"] = cfg.to_dict()  # what --batch-size, --lr and --weight-decay auto became (resume reads it)
    measured_s = time.monotonic() - t_measure
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(data)} images)")
    run = ResolvedRun(cfg, config, data, device, run_dir, steps_per_epoch, measured_s, resumed=old is not None,
                      start=start)
    if old is not None:
        _check_resume_compatible(old, config)
        config["compiled"] = resolve_compile(cfg, device, dist.world_size, steps_per_epoch, old)
        if dist.is_main:
            clean_partial(run_dir)
        run.checkpoint = latest_checkpoint(run_dir)
    else:
        config["compiled"] = resolve_compile(cfg, device, dist.world_size, steps_per_epoch)  # what auto became
    return run


def _recorded_config(run_dir: Path) -> dict[str, Any]:
    """The config.json of the run that --resume continues."""
    if not (run_dir / "config.json").exists():
        raise DitkitError(f"--resume: {run_dir} is not a run folder (no config.json); start without --resume")
    old = read_run_config(run_dir)
    if not isinstance(old.get("train"), dict):
        raise DitkitError(f"--resume: {run_dir}/config.json has no 'train' section; it was not written by ditkit train")
    return old


def resolve_auto_settings(cfg: TrainConfig, config: dict[str, Any], device: torch.device, world_size: int,
                          num_images: int) -> TrainConfig:
    """--batch-size, --lr and --weight-decay auto (None) made concrete; --batch-size auto within the memory
    budget (train.memory: the budget and what the probe measured go into config["memory"])."""
    from .memory import check_grad_checkpoint, fit_memory

    check_grad_checkpoint(cfg, config)
    if cfg.batch_size is None:
        batch = auto_batch_size(cfg, config, device, world_size, num_images)
        cfg = replace(cfg, batch_size=fit_memory(cfg, config, device, world_size, batch))
    elif cfg.memory_budget is not None:
        fit_memory(cfg, config, device, world_size, cfg.batch_size)  # a given batch the budget cannot hold: refused
    if cfg.lr is None:
        cfg = replace(cfg, lr=lr_for_batch(cfg.batch_size))
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer])
    return cfg


def lr_for_batch(batch: int) -> float:
    """--lr auto: 2.8e-3 at batch 64, scaled by the square root of the batch (~2e-3 at 32)."""
    return BASE_LR * math.sqrt(batch / BASE_BATCH)


def resolve_run_config(cfg: TrainConfig, data) -> dict[str, Any]:
    """What RUN/config.json holds: the model, the objective, the training settings and the data."""
    C, H, W = data.image_shape
    if H != W:
        raise UsageError(f"dataset images are {H}x{W}; the models need square images (set --image-size)")
    family = preset_family(cfg.model)
    text = family == "mmdit"  # a text model: conditioned on captions (TrainConfig.validate), never on classes
    num_classes = 0 if cfg.unconditional or text else data.num_classes
    masked = family == "mim"  # a masked image model: its tokenizer decides the codebook, the grid and the objective
    if masked != (cfg.tokenizer is not None):
        raise UsageError(f"--model {cfg.model}: a masked image model trains on a tokenizer's codes; give --tokenizer "
                         "DIR (ditkit train-tokenizer)" if masked else
                         f"--tokenizer: for a masked image model (MIM-T, MIM-S), not {cfg.model}")
    tok_model, tok_objective = ({}, None)
    if masked:
        from ..objectives.masked import masked_run_settings
        tok_model, tok_objective = masked_run_settings(cfg.tokenizer, (C, H, W), cfg.label_dropout)
    overrides = family_overrides(cfg, family)
    try:
        mcfg = model_config(cfg.model, input_size=H, in_channels=C, num_classes=num_classes, **overrides, **tok_model)
    except UsageError as e:
        if not cfg.model_overrides():
            raise
        given = " ".join(f"--{k} {v}" for k, v in cfg.shape_flags().items())
        raise UsageError(f"{cfg.model} with {given}: {e}") from None
    mean = DataMean.stored(data.mean_image()) if cfg.center == "mean" else None
    objective = build_objective(tok_objective or cfg.objective_config(mean, depth=getattr(mcfg, "depth", None)))
    config = {
        "ditkit_version": __version__,
        "family": family,
        "model_name": cfg.model,
        "model": mcfg.to_dict(),
        "objective": objective.config(),
        "train": cfg.to_dict(),
        "data": {"name": data.name, "shape": [C, H, W], "num_classes": num_classes,
                 "class_names": list(data.class_names) if num_classes else [], "num_images": len(data),
                 # the label prior, for sampling the data's class mix (`ditkit eval --labels prior`)
                 "class_counts": torch.bincount(data.labels, minlength=num_classes).tolist() if num_classes else []},
    }
    if text:  # runs.load_model builds the frozen encoder from this (ditkit.text.load_text_encoder)
        from ..text import TextSpec
        config["text"] = TextSpec().to_dict()
        config["data"]["captions"] = cfg.captions
    return config


def family_overrides(cfg: TrainConfig, family: str) -> dict[str, Any]:
    """The fields of the family's model config that the model flags set: the shape (--depth, --width,
    --heads) and the block parts (--pos-embed, and the experimental norm, qk_norm, mlp, rope). A DiT takes
    every block part; another family only those it has and that differ from TrainConfig's defaults (its
    presets choose their own), and a flag given for a field its config lacks is refused by name."""
    fields = {f.name for f in dataclasses.fields(get_family(family).config_cls)}
    default = TrainConfig()
    out: dict[str, Any] = {}
    for name, value in cfg.block_parts().items():
        if family == "dit" or (name in fields and value != getattr(default, name)):
            out[name] = value
        elif value != getattr(default, name):
            raise UsageError(f"--{name.replace('_', '-')} {value}: {cfg.model} (family {family}) has no such "
                             "setting; it is a DiT block part")
    for flag, value in cfg.shape_flags().items():
        name = TrainConfig.SHAPE_FIELDS[flag]
        if name not in fields:
            raise UsageError(f"--{flag} {value}: {cfg.model} (family {family}) has no {name}; its config has "
                             f"{', '.join(sorted(fields))}")
        out[name] = value
    return out


def _short(value: Any, limit: int = 60) -> str:
    """repr, cut to `limit` characters (a data_mean image is thousands)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _check_resume_compatible(old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("model", "objective", "data"):
        a, b = old.get(key), new.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):  # what an older ditkit did not record
            b = {k: v for k, v in b.items() if k in a or k not in DATA_KEYS_ADDED_LATER}
        if key == "model" and isinstance(a, dict) and old.get("family", "dit") == "dit":  # a DiT field an older
            # ditkit did not write had its default
            a = {**DiTConfig().to_dict(), **a}
        if a != b:
            fields = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k)) \
                if isinstance(a, dict) and isinstance(b, dict) else []
            diff = ", ".join(f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in fields)
            raise UsageError(f"--resume: the {key} settings differ from the run's config.json"
                             f"{': ' + diff if diff else ''}; resume with the same settings or start a new --out")
    recorded = TrainConfig.recorded(old["train"])
    changed = [k for k, v in new["train"].items() if recorded.get(k) != v and k not in TrainConfig.RESUMABLE_CHANGES]
    if changed:
        raise UsageError(f"--resume: these settings differ from the run's config.json: {', '.join(sorted(changed))}; "
                         "only the run length, logging and device may change")
    ws_old = old.get("world_size", 1)
    if ws_old != new.get("world_size", 1):
        raise UsageError(f"--resume: the run was written by {ws_old} process(es), now {new.get('world_size', 1)}; "
                         "the global batch is the same, but resume with the same world size for a bit-exact run")


# ---------------------------------------------------------------------------------------------
# --compile auto
# ---------------------------------------------------------------------------------------------


def compile_pays_here() -> Optional[str]:
    """None where --compile auto may compile on this CPU, else why not (torch's CPU capability)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in AUTO_COMPILE_SKIP_CPUS:
        return (f"this CPU's widest vectors are {cap} (no AVX-512), where a compiled training step was measured "
                "no faster than an eager one; --compile compiles anyway")
    return None


def check_compiler() -> None:
    """A clear error now, rather than at the first step, where torch.compile cannot build its kernels."""
    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)(torch.ones(8))
    except Exception as e:  # inductor: no C++ compiler, an unsupported platform, ...
        raise compile_failed(e, "train without --compile") from None


def resolve_compile(cfg: TrainConfig, device: torch.device, world_size: int, steps_per_epoch: int,
                    old: Optional[dict[str, Any]] = None) -> bool:
    """Whether this run compiles its training step. A resumed run (`old`: its config.json) keeps what it
    started with (compiled arithmetic differs from eager in its last bits). Otherwise --compile /
    --no-compile decide; auto (None) compiles one CPU process whose run is long enough for compilation
    to pay (AUTO_COMPILE_MIN_*) on a machine that can compile and where compiling speeds training up (not
    an AVX2-only CPU: `compile_pays_here`), and trains eagerly otherwise (saying why)."""
    if old is not None:
        was = old.get("compiled", bool(old["train"].get("compile")))
        if cfg.compile is not None and cfg.compile != was:
            raise UsageError(f"--resume: the run was trained {'with' if was else 'without'} compilation; "
                             f"resume it {'with --compile' if was else 'with --no-compile'} (or without either)")
        if was:
            check_compiler()
        return was
    if cfg.compile is not None:
        if cfg.compile:
            if world_size > 1:
                raise UsageError("--compile: not supported with several processes yet; train without it under torchrun")
            check_compiler()  # before the run folder exists: a machine that cannot compile loses nothing
        return cfg.compile
    steps = [n for n in (cfg.max_steps, math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else None) if n]
    long_enough = ((cfg.max_minutes is None or cfg.max_minutes >= AUTO_COMPILE_MIN_MINUTES)
                   and (not steps or min(steps) >= AUTO_COMPILE_MIN_STEPS))
    if world_size > 1 or device.type != "cpu" or not long_enough or cfg.captions is not None:
        return False  # (text models: compiling them is not measured yet)
    why_not = compile_pays_here()
    if why_not is not None:
        log.info("training without compilation: %s", why_not)
        return False
    try:
        check_compiler()
    except DitkitError as e:
        log.info("training without compilation: %s", e)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# --batch-size auto: a measured training step
# ---------------------------------------------------------------------------------------------


def probe_step(net, objective, shape: tuple, batch: int, num_classes: int, device: torch.device, amp: bool) -> None:
    """One forward and backward of the training loss through `net` (compiling it, if it is compiled) on a
    zero batch spread over the classes (and zero reference images, with a stable target), with noise from a
    generator of its own: the run's generator is left alone."""
    x = torch.zeros(batch, *shape, device=device)
    cond = (Condition.from_labels(torch.arange(batch, device=device) % num_classes, num_classes) if num_classes
            else Condition.none(batch))  # every class, as in a run
    noise = objective.sample_noise(batch, shape, torch.Generator().manual_seed(0))  # as the loop passes it
    refs = objective.stable_target  # the stable target's weighing is part of the step
    reference = (torch.zeros(refs, *shape, device=device),  # labels in order, as ImageDataset.draw gives them
                 torch.arange(refs, device=device) * num_classes // refs if num_classes else None) if refs else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = objective.loss(net, x, cond, noise=noise, reference=reference)
    loss.backward()


def seconds_per_step(model_config: dict[str, Any], objective, shape: tuple, batch: int, device: torch.device,
                     amp: bool, steps: int = PROBE_STEPS, warmup: int = PROBE_WARMUP,
                     optimizer: str = TrainConfig.optimizer, family: Optional[str] = None) -> float:
    """The measured time of one training step (forward, backward, the optimiser's step) at `batch` on a
    fresh copy of the model (of `family`, a DiT when None): the fastest of `steps` timed steps after
    `warmup` untimed ones."""
    model = build_model(model_config, family).to(device).train()
    opt = build_optimizer(model, optimizer, lr=1e-3, beta2=0.99, weight_decay=0.0, device=device)
    best = math.inf
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        probe_step(model, objective, shape, batch, model_config["num_classes"], device, amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best


def auto_batch_size(cfg: TrainConfig, config: dict[str, Any], device: torch.device, world_size: int,
                    num_images: int) -> int:
    """What --batch-size auto becomes (see AUTO_BATCHES). 64 unless the run is limited by time alone and
    trains in one process: then the first of AUTO_BATCHES whose measured step buys AUTO_BATCH_MIN_STEPS
    steps in the budget (else the last)."""
    if (cfg.max_minutes is None or cfg.max_steps is not None or cfg.epochs is not None or world_size > 1
            or cfg.captions is not None):  # the probe's step is a class model's
        return BASE_BATCH
    objective = build_objective(config["objective"])
    if hasattr(objective, "attach"):  # an objective with parts of its own to load (a tokenizer)
        objective.attach(None, device)
    shape, amp = tuple(config["data"]["shape"]), config["precision"] == "bf16"
    candidates = [b for b in AUTO_BATCHES if b <= num_images] or [min(AUTO_BATCHES)]
    said = []
    for batch in candidates:
        steps = int(cfg.max_minutes * 60 / seconds_per_step(config["model"], objective, shape, batch, device, amp,
                                                              family=config.get("family"),
                                                              optimizer=cfg.optimizer))
        said.append(f"{steps:,} steps at batch {batch}")
        if steps >= AUTO_BATCH_MIN_STEPS:
            break
    log.info("--batch-size auto: %d (measured here, %s minutes buy %s; wanted >= %d steps)", batch,
             f"{cfg.max_minutes:g}", ", ".join(said), AUTO_BATCH_MIN_STEPS)
    return batch
