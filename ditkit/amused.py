"""`ditkit amused`: text-to-image with diffusers' `AmusedPipeline` (Patil et al. 2024, "aMUSEd: An Open
MUSE Reproduction") from weights already on disk: the full-size counterpart of ditkit's own masked image
model (ditkit.models.mim), with the same MaskGIT-style decoding in ~12 steps.

No hub access at run time: the folder is a saved pipeline (`huggingface-cli download amused/amused-256
--local-dir DIR` on a machine with network, or `pipeline.save_pretrained(DIR)`), loaded with
`local_files_only=True`. A folder that is missing or incomplete is refused before diffusers reads it,
naming the component and the file that is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import DitkitError, UsageError

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


def check_model_dir(model_dir: str | Path) -> Path:
    """The pipeline folder, checked: model_index.json naming an AmusedPipeline, and each component's folder
    with its config and weights. A DitkitError naming the first things missing otherwise."""
    root = Path(model_dir)
    if not root.is_dir():
        raise DitkitError(f"--model-dir {root}: no such folder; {DOWNLOAD_HINT}")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise DitkitError(f"--model-dir {root}: model_index.json is missing, so this is not a saved diffusers "
                          f"pipeline; {DOWNLOAD_HINT}")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise DitkitError(f"--model-dir {root}: model_index.json is unreadable ({e})") from None
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        name = index.get("_class_name") if isinstance(index, dict) else None
        raise DitkitError(f"--model-dir {root}: a {name!r} pipeline, not an {PIPELINE_CLASS}")
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
        raise DitkitError(f"--model-dir {root}: incomplete {PIPELINE_CLASS}: missing {'; '.join(missing)}")
    return root


def load_amused(model_dir: str | Path, device: str = "cpu") -> Any:
    """diffusers' AmusedPipeline from a local folder (no network), on `device`, with its progress bar off."""
    root = check_model_dir(model_dir)
    from diffusers import AmusedPipeline
    from diffusers.utils import logging as dlogging

    from .utils import pick_device

    dev = pick_device(device)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the pipeline's deprecation notice is not the user's business
    try:
        pipe = AmusedPipeline.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DitkitError(f"--model-dir {root}: diffusers could not load the pipeline "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    finally:
        dlogging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def amused_generate(pipe: Any, prompts: Sequence[str], *, steps: int = 12, cfg_scale: float = 10.0, seed: int = 0,
                    size: Optional[int] = None) -> list:
    """One PIL image per prompt. Image i is drawn with its own generator, seeded by `image_seeds(seed)[i]`,
    so it does not depend on the other prompts."""
    import torch

    from .utils import image_seeds

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps {steps}: must be an integer >= 1 (aMUSEd uses 12)")
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("--prompt: give at least one non-empty prompt")
    if not (cfg_scale >= 0):
        raise UsageError(f"--cfg-scale {cfg_scale}: must be a number >= 0")
    if size is not None:
        f = pipe.vae_scale_factor
        if size < f or size % f:
            raise UsageError(f"--size {size}: must be a positive multiple of {f} (the VQ-GAN's downsampling)")
    images = []
    for prompt, s in zip(prompts, image_seeds(seed, len(prompts))):
        g = torch.Generator("cpu").manual_seed(s)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=float(cfg_scale), generator=g,
                   height=size, width=size)
        images.append(out.images[0])
    return images


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
