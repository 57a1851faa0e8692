"""`ditkit amused`: text-to-image with diffusers' `AmusedPipeline` (Patil et al. 2024, "aMUSEd: An Open
MUSE Reproduction") from weights already on disk: the full-size counterpart of ditkit's own masked image
model (ditkit.models.mim), with the same MaskGIT-style decoding in ~12 steps.

No hub access at run time: the folder is a saved pipeline (`huggingface-cli download amused/amused-256
--local-dir DIR` on a machine with network, or `pipeline.save_pretrained(DIR)`), loaded with
`local_files_only=True`. A folder that is missing or incomplete is refused before diffusers reads it,
naming the component and the file that is missing.

`amused_model(pipe)` presents the pipeline as a ditkit LoadedModel (a text model of no classes whose
objective samples in its own way), so that `ditkit.sampling.sample_batch`, and with it `ditkit serve
--amused DIR`, draw from it as from any ditkit run: the CLI and the server share one drawing path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .condition import Condition, TextNull
from .errors import DitkitError, UsageError
from .runs import LoadedModel
from .settings import SettingsError
from .text.encoder import PromptCache

PIPELINE_CLASS = "AmusedPipeline"
# component -> the files (any one of each tuple) that its folder needs
COMPONENT_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "vqvae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer": (("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")),
    "scheduler": (("scheduler_config.json",),),
}
DOWNLOAD_HINT = ("download it where there is network (`huggingface-cli download amused/amused-256 --local-dir DIR`) "
                 "and copy the folder here")


def check_model_dir(model_dir: str | Path, flag: str = "--model-dir") -> Path:
    """The pipeline folder, checked: model_index.json naming an AmusedPipeline, and each component's folder
    with its config and weights. A DitkitError naming `flag` and the first things missing otherwise."""
    root = Path(model_dir)
    if not root.is_dir():
        raise DitkitError(f"{flag} {root}: no such folder; {DOWNLOAD_HINT}")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise DitkitError(f"{flag} {root}: model_index.json is missing, so this is not a saved diffusers "
                          f"pipeline; {DOWNLOAD_HINT}")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise DitkitError(f"{flag} {root}: model_index.json is unreadable ({e})") from None
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        name = index.get("_class_name") if isinstance(index, dict) else None
        raise DitkitError(f"{flag} {root}: a {name!r} pipeline, not an {PIPELINE_CLASS}")
    missing = []
    for comp, needs in COMPONENT_FILES.items():
        folder = root / comp
        if comp not in index:
            missing.append(f"{comp} (not listed in model_index.json)")
        elif not folder.is_dir():
            missing.append(f"{comp} (no {comp}/ folder)")
        else:
            lacking = [" or ".join(alts) for alts in needs if not any((folder / f).is_file() for f in alts)]
            if lacking:
                missing.append(f"{comp} (no {comp}/{', '.join(lacking)})")
    if missing:
        raise DitkitError(f"{flag} {root}: incomplete {PIPELINE_CLASS}: missing {'; '.join(missing)}")
    return root


def load_amused(model_dir: str | Path, device: str = "cpu", flag: str = "--model-dir") -> Any:
    """diffusers' AmusedPipeline from a local folder (no network), on `device`, with its progress bar off."""
    root = check_model_dir(model_dir, flag)
    from diffusers import AmusedPipeline
    from diffusers.utils import logging as dlogging

    from .utils import pick_device

    dev = pick_device(device)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the pipeline's deprecation notice is not the user's business
    try:
        pipe = AmusedPipeline.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DitkitError(f"{flag} {root}: diffusers could not load the pipeline "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    finally:
        dlogging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


# -----------------------------------------------------------------------------------------------
# The pipeline as a ditkit model
# -----------------------------------------------------------------------------------------------
class AmusedPrompts:
    """The pipeline's CLIP text encoder behind the interface of ditkit's text encoder (ditkit.text.TextEncoder:
    `inspect`, `condition`, `null`, `stats`), which make_condition and the server's prompt checks read.

    A prompt becomes what the pipeline itself would compute: its CLIP token ids padded to the tokenizer's
    max length, the penultimate hidden states (L, D) as the tokens the transformer attends to, and the
    projected text embedding (Dp,) as the pooled vector. Each prompt is encoded on its own, so its encoding
    never depends on the other prompts of a batch; encodings are kept in an LRU cache keyed by the prompt."""

    def __init__(self, pipe: Any, cache_size: int = 1024):
        self.pipe = pipe
        self._cache = PromptCache(cache_size)
        self._lock = self._cache.lock
        self._null: Optional[TextNull] = None

    @property
    def max_tokens(self) -> int:
        """CLIP's context: prompts are padded or truncated to this many tokens (start and end included)."""
        return int(self.pipe.tokenizer.model_max_length)

    def stats(self) -> dict[str, Any]:
        return self._cache.stats()

    def inspect(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Per prompt: {"tokens": its token count, "truncated": whether it exceeds max_tokens} (the tokenizer
        only)."""
        from .text.encoder import _check_prompts

        out = []
        for p in _check_prompts(prompts, allow_empty=True):
            n = len(self.pipe.tokenizer(p, truncation=False, verbose=False)["input_ids"])  # no overlength warning
            out.append({"tokens": min(n, self.max_tokens), "truncated": n > self.max_tokens})
        return out

    def _run(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (L, D), pooled (Dp,)) of one prompt, as AmusedPipeline.__call__ encodes a prompt."""
        ids = self.pipe.tokenizer(prompt, return_tensors="pt", padding="max_length", truncation=True,
                                  max_length=self.max_tokens).input_ids.to(self.pipe.text_encoder.device)
        out = self.pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
        return out.hidden_states[-2][0], out.text_embeds[0]

    def encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache.get(prompt, self._run)

    def null(self) -> TextNull:
        """The empty prompt's encoding: the pipeline's default negative prompt, which guidance pushes from."""
        with self._lock:
            if self._null is None:
                tokens, pooled = self._run("")
                self._null = TextNull(tokens=tokens, mask=torch.ones(tokens.shape[0], dtype=torch.bool),
                                      pooled=pooled)
            return self._null

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> Condition:
        """tokens (B, L, D), an all-true mask (CLIP's padding is part of what aMUSEd was trained on), pooled
        (B, Dp), and the empty prompt as the null. An empty prompt is refused, as for ditkit's text models."""
        from .text.encoder import _check_prompts

        encs = [self.encode_one(p) for p in _check_prompts(prompts, allow_empty=False)]
        tokens = torch.stack([t for t, _ in encs])
        pooled = torch.stack([p for _, p in encs])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Condition.from_text(tokens, mask, pooled, self.null()).to(device)


def _values(scale: Any) -> list[float]:
    """A guidance scale given once or once per image, as a list."""
    return [float(v) for v in scale] if isinstance(scale, (list, tuple)) else [float(scale)]


class AmusedObjective:
    """aMUSEd's own decoding behind ditkit's hook for families that sample their own way (`sample_batch`,
    `kind`, `default_sampling`; see ditkit.sampling.sample_batch): sampler "maskgit", its steps, and
    cfg_scale as the pipeline's guidance_scale."""

    name = "amused"
    kind = "discrete"  # the "maskgit" sampler only (SamplingSettings.validate checks)
    default_sampling = {"sampler": "maskgit", "steps": 12, "cfg_scale": 10.0}  # the pipeline's own defaults

    def __init__(self, pipe: Any, height: int, width: int):
        self.pipe = pipe
        self.height = height
        self.width = width

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def check_settings(self, settings: Any) -> None:
        """Refuse, by field, what the pipeline cannot do (SamplingSettings.validate calls this)."""
        ag = settings.autoguidance
        unsupported = [("spacing", settings.spacing is not None), ("options", bool(settings.options)),
                       ("cfg_schedule", settings.cfg_schedule != "constant"),
                       ("guidance_interval", settings.guidance_interval is not None),
                       ("autoguidance", any(v != 1 for v in _values(ag))),
                       ("reject", settings.reject is not None), ("cache_interval", settings.cache_interval != 1),
                       ("best_of", settings.best_of != 1)]
        for field, bad in unsupported:
            if bad:
                raise SettingsError(field, "not available for aMUSEd (its pipeline decodes tokens on its own "
                                    "schedule); leave it out", getattr(settings, field))
        if any(0 < s < 1 for s in _values(settings.cfg_scale)):
            raise SettingsError("cfg_scale", "must be 0 (the empty prompt alone) or >= 1 (1 = no guidance): the "
                                "aMUSEd pipeline guides only above 1", settings.cfg_scale)

    @torch.no_grad()
    def sample_batch(self, model: Any, cond: Condition, seeds: Sequence[int], settings: Any, *,
                     callback: Optional[Callable[[dict], None]] = None,
                     stats: Optional[dict] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]. Image b is one pipeline call with its own CPU generator seeded by
        seeds[b] (the scheduler draws the tokens from it), so it depends on nothing else in the batch.
        Its guidance scale s: above 1, guided against the empty prompt; 1, unguided; 0, the empty prompt
        alone. `callback` gets {"i": step, "image": b, "tokens": (1, h, w) token ids} after each step."""
        self.check_settings(settings)
        scales = _values(settings.cfg_scale)
        scales = scales * len(seeds) if len(scales) == 1 else scales  # one per image
        null = cond.null()
        images = []
        for b, (seed, s) in enumerate(zip(seeds, scales)):
            src = null if s == 0 else cond
            negative = {}
            if s > 1:
                negative = dict(negative_prompt_embeds=null.pooled[b:b + 1],
                                negative_encoder_hidden_states=null.tokens[b:b + 1])
            step_cb = None
            if callback is not None:
                def step_cb(i: int, t: Any, tokens: torch.Tensor, b: int = b) -> None:
                    callback({"i": i, "image": b, "tokens": tokens})
            out = self.pipe(prompt_embeds=src.pooled[b:b + 1], encoder_hidden_states=src.tokens[b:b + 1],
                            guidance_scale=max(s, 1.0), num_inference_steps=settings.steps,
                            generator=torch.Generator("cpu").manual_seed(int(seed)), height=self.height,
                            width=self.width, output_type="pt", callback=step_cb, **negative)
            images.append(out.images)  # (1, 3, H, W) in [0, 1]
        if stats is not None:
            stats["nfe"] = settings.steps  # transformer calls per image (a guided call counts once)
        return (torch.cat(images).float() * 2 - 1).clamp(-1, 1)


class AmusedModel(LoadedModel):
    """An AmusedPipeline as a ditkit LoadedModel: a text model of no classes (net: its transformer,
    objective: AmusedObjective, text_encoder: AmusedPrompts), drawn by ditkit.sampling.sample_batch."""

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.objective.height, self.objective.width)

    @property
    def class_names(self) -> list[str]:
        return []


def amused_model(pipe: Any, size: Optional[int] = None) -> AmusedModel:
    """The pipeline as a ditkit model drawing size x size images (default: the pipeline's own size)."""
    if size is not None:
        f = pipe.vae_scale_factor
        if size < f or size % f:
            raise UsageError(f"--size {size}: must be a positive multiple of {f} (the VQ-GAN's downsampling)")
    side = size or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return AmusedModel(net=pipe.transformer, objective=AmusedObjective(pipe, side, side),
                       config={"model_name": f"aMUSEd-{side}", "family": "amused"}, text_encoder=AmusedPrompts(pipe))


def load_amused_model(model_dir: str | Path, device: str = "cpu", flag: str = "--model-dir") -> AmusedModel:
    """`load_amused` as a ditkit model (what `ditkit serve --amused DIR` serves)."""
    return amused_model(load_amused(model_dir, device, flag))


def amused_generate(pipe: Any, prompts: Sequence[str], *, steps: int = 12, cfg_scale: float = 10.0, seed: int = 0,
                    size: Optional[int] = None) -> list:
    """One PIL image per prompt. Image i is drawn with its own generator, seeded by `image_seeds(seed)[i]`,
    so it does not depend on the other prompts; the same path as `ditkit serve --amused` draws with."""
    from PIL import Image

    from .sampling import sample_batch, to_uint8
    from .settings import SamplingSettings
    from .utils import image_seeds

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps {steps}: must be an integer >= 1 (aMUSEd uses 12)")
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("--prompt: give at least one non-empty prompt")
    if not (cfg_scale >= 0):
        raise UsageError(f"--cfg-scale {cfg_scale}: must be a number >= 0")
    model = amused_model(pipe, size)
    x = sample_batch(model, [-1] * len(prompts), image_seeds(seed, len(prompts)),
                     SamplingSettings(sampler="maskgit", steps=steps, cfg_scale=float(cfg_scale)),
                     prompts=list(prompts))
    return [Image.fromarray(a) for a in to_uint8(x)]  # (H, W, 3) uint8 each


def register(sub, parser_class) -> None:
    from .cli_args import positive_int, seed_int

    p = sub.add_parser("amused", help="text-to-image with diffusers' AmusedPipeline from a local folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a saved AmusedPipeline folder (amused-256 or -512)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several images")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cfg-scale", type=float, default=10.0)
    p.add_argument("--size", type=positive_int("--size"), help="image side in pixels (default: the model's)")
    p.add_argument("--seed", type=seed_int(), default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="amused.png", help="a .png: one image, or a row of them for several prompts")
    p.set_defaults(func=run)


def run(args) -> int:
    from PIL import Image

    pipe = load_amused(args.model_dir, args.device)
    images = amused_generate(pipe, args.prompt, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                             size=args.size)
    w, h = images[0].size
    sheet = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB"), (i * w, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"{len(images)} image(s), {args.steps} steps: {out}")
    return 0
