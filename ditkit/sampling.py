"""One function that turns a trained network into images, for the CLI, the server, the training
loop's grids, FID and the benchmarks alike (EDM2's `generate_images()` habit).

    checkpoint -> net + objective -> denoiser (+ guidance) -> sampler -> uint8 images
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .condition import Condition
from .errors import DitkitError, UsageError
from .models import DiTConfig, build_model
from .objectives import build_objective
from .samplers import autoguided, count_calls, get_sampler, guided
from .samplers.guidance import check_interval, check_schedule
from .samplers.implicit import class_errors, relative_margin
from .train.checkpoint import guide_checkpoint, load_weights, read_state, resolve_checkpoint
from .utils import ImageRNG, compile_failed, image_seeds, pick_device

DEFAULT_SAMPLER = "dpm++2m-sde"  # measured: unguided FID 15 vs 35 for the ODE form at 20 NFE (docs/BENCHMARKS.md)
DEFAULT_STEPS = 20
# Euler and Heun run on the Karras grid by default (EDM, Alg. 1-2); the other samplers on the objective's.
SAMPLER_SPACING = {"euler": "karras", "heun": "karras"}


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

    @property
    def model_config(self) -> DiTConfig:
        return self.net.config

    @property
    def num_classes(self) -> int:
        return self.net.config.num_classes

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


def read_run_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DitkitError(f"{run_dir}/config.json: unreadable ({e})") from None
    if cfg.get("family") not in (None, "dit"):
        raise DitkitError(f"{run_dir}: a {cfg.get('family')!r} model; this command needs a DiT run "
                          "(a class- or un-conditional image diffusion model)")
    return cfg


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_model(ckpt: str | Path, *, weights: str = "ema", device: str = "auto",
               guide: str | Path | None = None, precision: str = "fp32", compile: bool = False) -> LoadedModel:
    """Load a run folder (its latest checkpoint) or one checkpoint folder; EMA weights by default.

    guide: the weak model for autoguidance: a run or checkpoint folder (e.g. an early checkpoint of the
    same run, or a smaller model of the same data); None = the run's own `guide/` when it has one.
    precision: the network's weights and arithmetic, "fp32" or "bf16" (the sampler's state stays fp32).
    bf16 doubles batched throughput on CPUs with bf16 matrix units but is slower for one image; each
    precision keeps "one seed, one image" bit for bit, but the two give (slightly) different images.
    compile: run the network through `torch.compile` (see `DiT.compile_for_inference`): 10-25% faster
    on the CPU, after ~25 s of compilation here, done now; its images are its own, like a precision's.
    The weak model of autoguidance stays eager.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    run_dir, ck = resolve_checkpoint(ckpt)
    main = _load_one(run_dir, ck, weights, device, precision)
    if guide is not None:
        g_run, g_ck = resolve_checkpoint(guide)
        main.guide = _load_one(g_run, g_ck, "ema", device, precision)
        _check_guide(main, main.guide, str(guide))
    elif (own := guide_checkpoint(run_dir)) is not None and int(read_state(own).get("step", 0)) < main.step:
        main.guide = _load_one(run_dir, own, "ema", device, precision)  # only an earlier guide is weaker
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
    try:
        net = build_model(cfg["model"])
        objective = build_objective(cfg["objective"])
    except KeyError as e:
        raise DitkitError(f"{run_dir}/config.json: missing key {e}") from None
    try:
        net.load_state_dict(load_weights(ck, weights))
    except RuntimeError as e:
        raise DitkitError(f"checkpoint {ck}: weights do not match the model in config.json ({str(e)[:200]})") from None
    dev = pick_device(device)
    net.to(dev, PRECISIONS[precision]).eval().requires_grad_(False)
    return LoadedModel(net, objective, cfg, run_dir, ck, int(read_state(ck).get("step", 0)))


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


def _weak_model(model: LoadedModel) -> LoadedModel:
    """The model's weak model for autoguidance; a UsageError saying how to get one otherwise."""
    if model.guide is None:
        where = f" ({model.run_dir}/guide is missing)" if model.run_dir is not None else ""
        raise UsageError(f"--autoguidance: this model has no weak model to guide with{where}; train with "
                         "--guide-at > 0 (the default keeps one), or pass --guide RUN_OR_CHECKPOINT")
    return model.guide


def stratified_labels(counts: Sequence[int], num: int) -> list[int]:
    """`num` labels in the proportions of `counts` (images per class in the training data).

    Each class gets its share rounded by largest remainder, so the mix is exact rather than drawn (a
    multinomial draw of 3,000 labels is off by ~17 per class, and FID reads that as a worse distribution),
    and the classes are interleaved evenly, so every batch holds nearly the same mix."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise UsageError(f"class counts must be non-negative with a positive sum, got {counts.tolist()}")
    raw = counts / counts.sum() * num
    share = np.floor(raw).astype(np.int64)
    share[np.argsort(-(raw - share), kind="stable")[: num - int(share.sum())]] += 1
    pos = np.concatenate([(np.arange(k) + 0.5) / k for k in share if k])
    labs = np.concatenate([np.full(k, c) for c, k in enumerate(share) if k])
    return [int(v) for v in labs[np.argsort(pos, kind="stable")]]


_LABELS_HELP = "give a class id, a comma list like 0,1,2, 'all' (balanced) or 'prior' (the training mix)"


def parse_labels(spec: str | Sequence[int] | None, num: int, num_classes: int,
                 class_counts: Optional[Sequence[int]] = None) -> list[int]:
    """`3`, `0,1,2` (cycled to `num`), `all` (a balanced set: 0,1,..,K-1,0,1,..; also None) or `prior`
    (the classes in the proportions of the training data, `class_counts`: see `stratified_labels`).
    For an unconditional model only None, 'all' and 'prior' are allowed (they all mean its one distribution)."""
    if num_classes == 0:
        if spec not in (None, "", "none", "all", "prior"):
            raise UsageError("--labels: this model is unconditional; leave --labels out")
        return [-1] * num
    if spec is None or spec == "all":
        return [i % num_classes for i in range(num)]
    if spec == "prior":
        if not class_counts:
            raise UsageError("--labels prior: this run does not record how many training images each class had "
                             "(an older ditkit trained it); use --labels all (balanced)")
        if len(class_counts) != num_classes:
            raise UsageError(f"--labels prior: the run records {len(class_counts)} class counts for "
                             f"{num_classes} classes")
        return stratified_labels(class_counts, num)
    if isinstance(spec, str):
        try:
            vals = [int(v) for v in spec.split(",") if v.strip() != ""]
        except ValueError:
            raise UsageError(f"--labels {spec!r}: {_LABELS_HELP}") from None
    else:
        vals = [int(v) for v in spec]
    if not vals:
        raise UsageError(f"--labels: empty list; {_LABELS_HELP}")
    bad = [v for v in vals if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--labels {bad}: class ids must be in 0..{num_classes - 1}")
    return [vals[i % len(vals)] for i in range(num)]


def validate_sampling(model: LoadedModel, sampler: str, steps: int, cfg_scale, autoguidance=1.0,
                      cfg_schedule: str = "constant", guidance_interval=None) -> None:
    spec = get_sampler(sampler)
    check_schedule(cfg_schedule)
    check_interval(guidance_interval)
    obj = model.objective
    limit = getattr(obj, "num_timesteps", None)
    if steps < 1 or (limit is not None and steps > limit):
        raise UsageError(f"--steps {steps}: must be between 1 and {limit or 'any'}"
                         + (f" (the model's {limit} training steps)" if limit else ""))
    scales = np.atleast_1d(np.asarray(cfg_scale, dtype=np.float64))
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise UsageError(f"--cfg-scale {cfg_scale}: must be a finite number >= 0 (1 = no guidance)")
    if np.any(scales != 1) and model.num_classes == 0:
        raise UsageError("--cfg-scale: this model is unconditional; guidance needs a class model (use 1)")
    ag = np.atleast_1d(np.asarray(autoguidance, dtype=np.float64))
    if not np.all(np.isfinite(ag)) or np.any(ag < 0):
        raise UsageError(f"--autoguidance {autoguidance}: must be a finite number >= 0 (1 = off)")
    if np.any(ag != 1):
        _weak_model(model)
    if spec.needs_path and getattr(obj, "path", None) is None:
        raise UsageError(f"--sampler {sampler}: needs a continuous-time objective (linear, gvp, vp); "
                         f"this model's objective is {obj.config()['name']!r}")


@torch.no_grad()
def sample_batch(model: LoadedModel, labels: Sequence[int], seeds: Sequence[int], *, sampler: str = DEFAULT_SAMPLER,
                 steps: int = DEFAULT_STEPS, cfg_scale: float | Sequence[float] = 1.0, spacing: Optional[str] = None,
                 guidance_interval: Optional[tuple[float, float]] = None, sampler_options: Optional[dict] = None,
                 callback: Optional[Callable[[dict], None]] = None, stats: Optional[dict] = None,
                 autoguidance: float | Sequence[float] = 1.0, cfg_schedule: str = "constant") -> torch.Tensor:
    """One batch: image b is fully determined by (labels[b], seeds[b], settings). Returns float (B,C,H,W) in [-1,1].

    cfg_scale: classifier-free guidance; cfg_schedule: "constant" or "ramp" (the scale along the noise
    levels: samplers.guidance.SCHEDULES); autoguidance: the scale w of autoguidance by `model.guide`
    (Karras et al. 2024); each a float or one value per image, 1 = off."""
    spec = get_sampler(sampler)
    dev = model.device
    B = len(seeds)
    rng = ImageRNG(seeds, dev)
    noise = rng.randn(model.image_shape)
    if model.num_classes > 0:
        cond = Condition.from_labels(torch.tensor(list(labels), dtype=torch.long, device=dev), model.num_classes)
    else:
        cond = Condition.none(B)
    denoiser = model.objective.denoiser(model.net)
    scale = torch.as_tensor(cfg_scale, dtype=torch.float32)
    if model.num_classes > 0 and bool((scale != 1).any()):
        denoiser = guided(denoiser, scale.to(dev) if scale.ndim else float(scale), interval=guidance_interval,
                          schedule=cfg_schedule)
    ag = torch.as_tensor(autoguidance, dtype=torch.float32)
    if bool((ag != 1).any()):
        weak = _weak_model(model)
        denoiser = autoguided(denoiser, weak.objective.denoiser(weak.net), ag.to(dev) if ag.ndim else float(ag),
                              interval=guidance_interval)
    counted = count_calls(denoiser)
    sigmas = model.objective.sigma_grid(steps, spacing or SAMPLER_SPACING.get(sampler, model.objective.default_spacing))
    x = spec.fn(counted, noise, sigmas, cond=cond, rng=rng, callback=callback, **(sampler_options or {}))
    if stats is not None:
        stats["nfe"] = counted.calls
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# the stream of an image's seed that feeds its implicit-classifier noise (attempts use streams 1, 2, ...)
IMPLICIT_STREAM = 1 << 20
REJECT_TRIES = 4  # draws of an image in all under --reject


def check_reject(model: LoadedModel, reject: Optional[float], tries: int) -> None:
    if reject is None:
        return
    if not (np.isfinite(reject) and 0 <= reject < 1):
        raise UsageError(f"--reject {reject}: must be a number in [0, 1) (the asked class's denoising error "
                         "must lie this fraction below every other class's; 0 = the asked class is the best)")
    if model.num_classes < 2:
        raise UsageError("--reject: this model is unconditional; rejection by the model's own class evidence "
                         "needs a class model")
    if tries < 2:
        raise UsageError(f"reject_tries {tries}: must be >= 2 (the first draw and at least one redraw)")


def implicit_errors(model: LoadedModel, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """`samplers.implicit.class_errors` (B, num_classes) of images x (B, C, H, W) in [-1, 1], each image's noise
    drawn from the implicit-classifier stream of its seed, so its verdict depends on nothing else."""
    rng = ImageRNG([image_seeds(s, 1, start=IMPLICIT_STREAM)[0] for s in seeds], model.device)
    return class_errors(model.objective.denoiser(model.net), x, model.num_classes, rng)


def implicit_margins(model: LoadedModel, x: torch.Tensor, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """`samplers.implicit.relative_margin` of images x (B, C, H, W) in [-1, 1] drawn for `labels` with `seeds`:
    below 0 where the model's own conditional denoisers explain the image best by the asked class."""
    return relative_margin(implicit_errors(model, x, seeds), torch.as_tensor(list(labels)))


def _redraw_rejected(model: LoadedModel, x: torch.Tensor, labels: Sequence[int], seeds: Sequence[int],
                     reject: float, tries: int, kw: dict) -> tuple[torch.Tensor, int, int]:
    """Redraw, with a new seed each time, every image whose implicit margin is not below -reject, up to
    `tries` draws in all; an image still rejected after its last draw is kept. Returns (x, redraws, kept)."""
    bad = implicit_margins(model, x, labels, seeds) >= -reject
    redraws = 0
    for attempt in range(1, tries):
        idx = bad.nonzero().flatten().tolist()
        if not idx:
            break
        labs = [labels[i] for i in idx]
        new_seeds = [image_seeds(seeds[i], 1, start=attempt)[0] for i in idx]
        xn = sample_batch(model, labs, new_seeds, **kw)
        x[idx] = xn
        bad[idx] = implicit_margins(model, xn, labs, new_seeds) >= -reject
        redraws += len(idx)
    return x, redraws, int(bad.sum())


def generate(model: LoadedModel, *, num: int, labels: str | Sequence[int] | None = None, seed: int = 0,
             batch_size: int = 100, progress: Optional[Callable[[int], None]] = None,
             reject: Optional[float] = None, reject_tries: int = REJECT_TRIES, **kw) -> dict[str, Any]:
    """Generate `num` images. Image i depends only on (seed, i, label i, settings), never on batch size.
    labels: see `parse_labels` (None: balanced).

    reject: None (off) or a margin m in [0, 1): an image the model itself does not read as its asked class,
    by at least m (`samplers.implicit`), is drawn again with a new seed, up to `reject_tries` draws in all.
    Each verdict costs len(implicit.SIGMAS) x num_classes network evaluations.

    Returns {"images": uint8 (N,H,W,C), "labels": int64 (N,), "seeds": list, "nfe": int, "seconds": float},
    with rejection also "redraws" (images drawn again, in all) and "rejected_kept" (still rejected at the
    last draw). "seeds" are the first draws' seeds: a redraw's seed is derived from its image's seed and
    the attempt (`image_seeds(seed_i, 1, start=attempt)`), so an image still depends on nothing else.
    """
    if num < 1:
        raise UsageError(f"--num {num}: must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    validate_sampling(model, kw.get("sampler", DEFAULT_SAMPLER), kw.get("steps", DEFAULT_STEPS), kw.get("cfg_scale", 1.0),
                      kw.get("autoguidance", 1.0), kw.get("cfg_schedule", "constant"), kw.get("guidance_interval"))
    check_reject(model, reject, reject_tries)
    labs = parse_labels(labels, num, model.num_classes, model.class_counts)
    seeds = image_seeds(seed, num)
    out, nfe, t0 = [], 0, time.perf_counter()
    redraws = kept = 0
    for start in range(0, num, batch_size):
        stats: dict = {}
        b_labels, b_seeds = labs[start:start + batch_size], seeds[start:start + batch_size]
        x = sample_batch(model, b_labels, b_seeds, stats=stats, **kw)
        nfe = stats["nfe"]
        if reject is not None:
            x, r, k = _redraw_rejected(model, x, b_labels, b_seeds, reject, reject_tries, kw)
            redraws, kept = redraws + r, kept + k
        out.append(to_uint8(x))
        if progress is not None:
            progress(len(b_seeds))
    res = {"images": np.concatenate(out), "labels": np.asarray(labs, dtype=np.int64), "seeds": seeds, "nfe": nfe,
           "seconds": time.perf_counter() - t0}
    if reject is not None:
        res.update(redraws=redraws, rejected_kept=kept)
    return res
