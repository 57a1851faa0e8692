"""One function that turns a trained network into images, for the CLI, the server, the training
loop's grids, FID and the benchmarks alike (EDM2's `generate_images()` habit).

    checkpoint -> net + objective -> denoiser (+ guidance) -> sampler -> uint8 images
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .condition import Condition
from .errors import DitkitError, UsageError
from .runs import PRECISIONS, LoadedModel, compile_model, load_model  # noqa: F401  (the API's names)
from .samplers import autoguided, count_calls, get_sampler, guided
from .bestof import best_of_batch
from .samplers.cache import DeltaCache
from .samplers.implicit import class_errors, relative_margin
from .settings import DEFAULT_SAMPLER, DEFAULT_STEPS, REJECT_TRIES, SAMPLER_SPACING, SamplingSettings  # noqa: F401
from .utils import ImageRNG, image_seeds

SettingsLike = Optional[SamplingSettings]


def settings_of(settings: SettingsLike = None, **changes: Any) -> SamplingSettings:
    """`settings` (default: the untuned defaults) with `changes` (any SamplingSettings field) applied."""
    base = settings if settings is not None else SamplingSettings()
    if not isinstance(base, SamplingSettings):
        raise UsageError(f"settings must be a SamplingSettings, got {type(base).__name__}")
    return base.replace(**changes) if changes else base


def default_settings(model: Any) -> SamplingSettings:
    """The untuned default for `model`: SamplingSettings(), or, for a family that samples its own way, its
    objective's `default_sampling` (a masked image model: maskgit, 12 steps)."""
    own = dict(getattr(getattr(model, "objective", None), "default_sampling", None) or {})
    if own.get("cfg_scale", 1.0) != 1.0 and getattr(model, "num_classes", 0) == 0 \
            and getattr(model, "text_encoder", None) is None:
        own.pop("cfg_scale")  # an unconditional model has nothing to guide by
    return SamplingSettings(**own) if own else SamplingSettings()


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


def validate_sampling(model: LoadedModel, settings: SettingsLike = None, **changes: Any) -> SamplingSettings:
    """The settings, checked against the model (see `SamplingSettings.validate`)."""
    return settings_of(settings if settings is not None else default_settings(model), **changes).validate(model)


def make_condition(model: LoadedModel, labels: Sequence[int], prompts: Optional[Sequence[str]],
                   device: torch.device) -> Condition:
    """The condition of a batch: prompts for a text model (through its frozen encoder), class labels for a
    class model, nothing for an unconditional one."""
    if prompts is not None:
        if model.text_encoder is None:
            raise UsageError("--prompt: this model takes class labels, not text; use --labels")
        return model.text_encoder.condition(list(prompts), device)
    if model.text_encoder is not None:
        raise UsageError("this model draws from text prompts; give --prompt (or prompts=[...])")
    if model.num_classes > 0:
        return Condition.from_labels(torch.tensor(list(labels), dtype=torch.long, device=device), model.num_classes)
    return Condition.none(len(labels))


@torch.no_grad()
def sample_batch(model: LoadedModel, labels: Sequence[int], seeds: Sequence[int], settings: SettingsLike = None, *,
                 prompts: Optional[Sequence[str]] = None, callback: Optional[Callable[[dict], None]] = None,
                 stats: Optional[dict] = None, **changes: Any) -> torch.Tensor:
    """One batch: image b is fully determined by (labels[b] or prompts[b], seeds[b], settings). Returns float
    (B, C, H, W) in [-1, 1]. `changes` override fields of `settings` (e.g. cfg_scale as one value per image);
    the settings are not validated here (`generate` and the server do that once per request)."""
    st = settings_of(settings, **changes)
    dev = model.device
    cond = make_condition(model, labels, prompts, dev)
    if hasattr(model.objective, "sample_batch"):  # a family with its own sampling (discrete tokens)
        return model.objective.sample_batch(model, cond, seeds, st, callback=callback, stats=stats)
    spec = get_sampler(st.sampler)
    rng = ImageRNG(seeds, dev)
    noise = rng.randn(model.image_shape)
    net = model.net if st.cache_interval == 1 else DeltaCache(model.net, st.cache_interval)  # samplers.cache
    denoiser = model.objective.denoiser(net)
    scale = torch.as_tensor(st.cfg_scale, dtype=torch.float32)
    if (model.num_classes > 0 or prompts is not None) and bool((scale != 1).any()):
        denoiser = guided(denoiser, scale.to(dev) if scale.ndim else float(scale), interval=st.guidance_interval,
                          schedule=st.cfg_schedule)
    ag = torch.as_tensor(st.autoguidance, dtype=torch.float32)
    if bool((ag != 1).any()):
        weak = _weak_model(model)
        denoiser = autoguided(denoiser, weak.objective.denoiser(weak.net), ag.to(dev) if ag.ndim else float(ag),
                              interval=st.guidance_interval)
    counted = count_calls(denoiser)
    sigmas = model.objective.sigma_grid(st.steps, st.spacing or SAMPLER_SPACING.get(st.sampler,
                                                                                  model.objective.default_spacing))
    x = spec.fn(counted, noise, sigmas, cond=cond, rng=rng, callback=callback, **dict(st.options))
    if stats is not None:
        stats["nfe"] = counted.calls
    if model.decoder is not None:  # a latent model: the sampler ends in VAE latents
        x = model.decoder(x)
    return x.clamp(-1, 1)


def _weak_model(model: LoadedModel) -> LoadedModel:
    """The model's weak model for autoguidance (SamplingSettings.validate has checked that it has one)."""
    if model.guide is None:
        raise UsageError("--autoguidance: this model has no weak model to guide with; pass --guide RUN")
    return model.guide


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# the stream of an image's seed that feeds its implicit-classifier noise (attempts use streams 1, 2, ...)
IMPLICIT_STREAM = 1 << 20


def check_reject(model: LoadedModel, reject: Optional[float], tries: int = REJECT_TRIES) -> None:
    """`reject` and `tries` checked, and against the model's classes (as `SamplingSettings.validate` does)."""
    from .settings import SettingsError

    SamplingSettings(reject=reject, reject_tries=tries).check()
    if reject is not None and model.num_classes < 2:
        raise SettingsError("reject", "this model is unconditional; rejection by the model's own class evidence needs a class model", reject)


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
                     settings: SamplingSettings) -> tuple[torch.Tensor, int, int]:
    """Redraw, with a new seed each time, every image whose implicit margin is not below -settings.reject, up to
    `settings.reject_tries` draws in all; an image still rejected after its last draw is kept.
    Returns (x, redraws, kept)."""
    reject = settings.reject
    bad = implicit_margins(model, x, labels, seeds) >= -reject
    redraws = 0
    for attempt in range(1, settings.reject_tries):
        idx = bad.nonzero().flatten().tolist()
        if not idx:
            break
        labs = [labels[i] for i in idx]
        new_seeds = [image_seeds(seeds[i], 1, start=attempt)[0] for i in idx]
        xn = sample_batch(model, labs, new_seeds, settings)
        x[idx] = xn
        bad[idx] = implicit_margins(model, xn, labs, new_seeds) >= -reject
        redraws += len(idx)
    return x, redraws, int(bad.sum())


def _parse_prompts(prompts: Optional[Sequence[str]], num: int) -> Optional[list[str]]:
    """Prompts cycled to `num` images, or None; a UsageError for an empty list or a non-text entry."""
    if prompts is None:
        return None
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UsageError("--prompt: give at least one prompt")
    for p in prompts:
        if not isinstance(p, str):
            raise UsageError(f"--prompt {p!r}: prompts must be text")
    return [prompts[i % len(prompts)] for i in range(num)]


def generate(model: LoadedModel, settings: SettingsLike = None, *, num: int,
             labels: str | Sequence[int] | None = None, prompts: Optional[Sequence[str]] = None, seed: int = 0,
             batch_size: int = 100, progress: Optional[Callable[[int], None]] = None,
             **changes: Any) -> dict[str, Any]:
    """Generate `num` images. Image i depends only on (seed, i, label or prompt i, settings), never on batch size.

    settings: how to draw (`SamplingSettings`; default: the untuned defaults); `changes` override any of its
    fields (e.g. `steps=50, cfg_scale=1.5`). labels: see `parse_labels` (None: balanced); prompts: text for a
    text model, cycled to `num`.

    With `settings.reject` (a margin m in [0, 1)), an image the model itself does not read as its asked class
    by at least m (`samplers.implicit`) is drawn again with a new seed, up to `settings.reject_tries` draws in
    all; each verdict costs len(implicit.SIGMAS) x num_classes network evaluations.

    Returns {"images": uint8 (N,H,W,C), "labels": int64 (N,), "seeds": list, "nfe": int, "seconds": float,
    "settings": the SamplingSettings used}, with rejection also "redraws" (images drawn again, in all) and
    "rejected_kept" (still rejected at the last draw). "seeds" are the first draws' seeds: a redraw's seed is
    derived from its image's seed and the attempt (`image_seeds(seed_i, 1, start=attempt)`).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UsageError(f"--num {num}: must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be an integer >= 1")
    st = settings_of(settings if settings is not None else default_settings(model), **changes).validate(model)
    prompt_list = _parse_prompts(prompts, num)
    if st.reject is not None and prompt_list is not None:
        raise UsageError("--reject: rejection reads the model's class evidence; it does not apply to prompts")
    labs = parse_labels(labels, num, model.num_classes, model.class_counts) if prompt_list is None else [-1] * num
    seeds = image_seeds(seed, num)
    out, nfe, t0 = [], 0, time.perf_counter()
    redraws = kept = 0
    for start in range(0, num, batch_size):
        stats: dict = {}
        b_labels, b_seeds = labs[start:start + batch_size], seeds[start:start + batch_size]
        b_prompts = None if prompt_list is None else prompt_list[start:start + batch_size]
        if st.best_of > 1:  # N draws of each image, the verifier's favourite kept (ditkit.bestof)
            x = best_of_batch(model, b_labels, b_seeds, st.best_of, st.verifier,
                              lambda labs, sds: sample_batch(model, labs, sds, st, stats=stats), stats)
        else:
            x = sample_batch(model, b_labels, b_seeds, st, prompts=b_prompts, stats=stats)
        nfe = stats.get("nfe", 0)
        if st.reject is not None:
            x, r, k = _redraw_rejected(model, x, b_labels, b_seeds, st)
            redraws, kept = redraws + r, kept + k
        out.append(to_uint8(x))
        if progress is not None:
            progress(len(b_seeds))
    res = {"images": np.concatenate(out), "labels": np.asarray(labs, dtype=np.int64), "seeds": seeds, "nfe": nfe,
           "seconds": time.perf_counter() - t0, "settings": st}
    if prompt_list is not None:
        res["prompts"] = prompt_list
    if st.reject is not None:
        res.update(redraws=redraws, rejected_kept=kept)
    return res
