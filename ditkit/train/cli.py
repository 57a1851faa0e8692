"""`ditkit train`: flags, then `ditkit.train.loop.train`. No logic lives here.

The main help holds what a first run needs (the model, the data, the run's folder and length); the rest sits
in named groups. Options that measured no better than the default left the command line for
`ditkit.experimental`: giving one says so in one line.
"""

from __future__ import annotations

import argparse
import json
import os

from ..cli_args import finite_float, nonneg_int, or_auto, positive_int, seed_int


class _RemovedFlag(argparse.Action):
    """A flag that left the command line: one line naming where it lives now, exit code 2 (not argparse's
    usage dump). It takes an optional value, so `--dispersive 0.25` and `--qk-norm` read alike."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..experimental import removed_flag_message

        parser.exit(2, f"{parser.prog}: error: {removed_flag_message(option_string)}\n")


def register(sub, parser_class) -> None:
    from ..experimental import REMOVED_FLAGS
    from ..models import PRESETS
    from .config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (a DiT by default; --model picks the family's preset)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a model on MNIST or a folder of images; the run folder gets config.json, "
                                   "checkpoints, sample grids and metrics.jsonl.")
    p.add_argument("--model", default=d.model, choices=list(PRESETS), help="model preset")
    p.add_argument("--dataset", default=d.dataset, help="'mnist' or a folder of images (one sub-folder per class)")
    p.add_argument("--image-size", type=positive_int("--image-size"), help="image size (folders; MNIST: 28)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="image channels (folders)")
    p.add_argument("--captions", metavar="mnist|FILE.jsonl",
                   help="text to image (an MMDiT-* model): 'mnist' (captions generated from each digit) or a file "
                        'of {"file": ..., "text": ...} lines; --label-dropout drops captions to the empty prompt')
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a masked image model (MIM-*): the tokenizer run it models the codes of (ditkit train-tokenizer)")
    p.add_argument("--subset", type=positive_int("--subset"), help="train on the first N images only")
    p.add_argument("--unconditional", action="store_true", help="ignore class labels")
    p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--max-steps", type=positive_int("--max-steps"))
    p.add_argument("--epochs", type=finite_float("--epochs", 0, True),
                   help="the run's length in epochs (one epoch when no length is given)")
    p.add_argument("--max-minutes", type=finite_float("--max-minutes", 0, True),
                   help="a time budget; with it alone, the step count is planned from the measured speed")
    p.add_argument("--seed", type=seed_int("--seed"), default=d.seed)
    _add_model_shape(p.add_argument_group("model shape"), d)
    _add_objective(p.add_argument_group("objective"), d)
    _add_optimisation(p.add_argument_group("schedule and optimiser"), d)
    _add_logging(p.add_argument_group("logging, checkpoints and sample grids"), d)
    _add_hardware(p.add_argument_group("hardware"), d)
    for flag in REMOVED_FLAGS:
        p.add_argument(flag, action=_RemovedFlag)
    p.set_defaults(func=_cmd_train)


def _add_model_shape(g, d) -> None:
    g.add_argument("--depth", type=positive_int("--depth"), help="number of blocks (default: the preset's)")
    g.add_argument("--width", type=positive_int("--width"), help="hidden size (default: the preset's)")
    g.add_argument("--heads", type=positive_int("--heads"), help="attention heads (default: the preset's)")
    g.add_argument("--pos-embed", default=d.pos_embed, choices=["sincos", "learned"], help="DiT position embedding")


def _add_objective(g, d) -> None:
    from ..objectives import OBJECTIVES
    from .config import STABLE_TARGET_REFS

    g.add_argument("--objective", default=d.objective, choices=list(OBJECTIVES),
                   help="ddpm (discrete VP) or an interpolant path (linear = rectified flow, gvp, vp)")
    g.add_argument("--prediction", choices=["eps", "v", "x0", "velocity", "noise", "data"],
                   help="network output (ddpm: eps|v|x0, default eps; interpolants: velocity|noise|data, default "
                        "velocity)")
    g.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine"], help="ddpm beta schedule")
    g.add_argument("--time-sampling", default=d.time_sampling, choices=["uniform", "logit-normal"],
                   help="interpolant training-time distribution")
    g.add_argument("--logit-mean", type=finite_float("--logit-mean"), default=d.logit_mean,
                   help="interpolants: location of the logit-normal training times (< 0: more weight near the data)")
    g.add_argument("--stable-target", type=or_auto(nonneg_int("--stable-target")), default="auto", metavar="M|auto",
                   help="interpolants: learn each image's target from its posterior mean of x0 over its own image and "
                        "M reference images drawn each step (of its class): a lower-variance target (Xu et al. 2023, "
                        f"stable target field); 0 = off; auto: {STABLE_TARGET_REFS} for the interpolants, 0 for ddpm")
    g.add_argument("--min-snr-gamma", type=finite_float("--min-snr-gamma", 0, True), help="ddpm min-SNR loss weighting")
    g.add_argument("--label-dropout", type=finite_float("--label-dropout", 0), default=d.label_dropout,
                   help="share of labels (or captions) dropped to the null condition, for guidance")
    g.add_argument("--center", default=d.center, choices=["none", "mean"],
                   help="mean = the network learns each image minus the training set's mean image, which the "
                        "denoiser adds back (stored in config.json)")


def _add_optimisation(g, d) -> None:
    from .optim import OPTIMIZERS

    # default "auto" (a string: argparse passes it through `type`, which makes it None, TrainConfig's auto)
    g.add_argument("--batch-size", type=or_auto(positive_int("--batch-size")), default="auto", metavar="N|auto",
                   help="auto: 64; with --max-minutes alone, 32 where this machine's measured speed makes fewer "
                        "than 3,000 steps at 64 in the budget")
    g.add_argument("--lr", type=or_auto(finite_float("--lr", 0, True)), default="auto", metavar="LR|auto",
                   help="auto: 2.8e-3 at batch 64, scaled by sqrt(batch / 64)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="muon: Muon (orthogonalised momentum) on the blocks' hidden matrices, AdamW on the rest, at "
                        "the same --lr; adamw: AdamW on every parameter")
    g.add_argument("--weight-decay", type=or_auto(finite_float("--weight-decay", 0)), default="auto",
                   metavar="WD|auto", help="decoupled weight decay; auto: 0 with adamw, 0.1 with muon")
    g.add_argument("--beta2", type=finite_float("--beta2", 0, True), default=d.beta2, help="AdamW beta2")
    g.add_argument("--warmup-steps", type=nonneg_int("--warmup-steps"), default=d.warmup_steps)
    g.add_argument("--lr-decay", type=finite_float("--lr-decay", 0), default=d.lr_decay,
                   help="fraction of the run, at its end, over which the lr decays linearly to 0")
    g.add_argument("--grad-clip", type=finite_float("--grad-clip", 0), default=d.grad_clip, help="0 = off")
    g.add_argument("--ema-decay", type=finite_float("--ema-decay", 0), default=d.ema_decay)
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false")
    g.add_argument("--guide-at", type=finite_float("--guide-at", 0), default=d.guide_at,
                   help="keep the EMA weights at this fraction of the run as RUN/guide, the weak model of "
                        "autoguidance (ditkit sample --autoguidance); 0 = keep none")


def _add_logging(g, d) -> None:
    from ..samplers import SAMPLERS

    g.add_argument("--log-every", type=nonneg_int("--log-every"), default=d.log_every)
    g.add_argument("--ckpt-every", type=nonneg_int("--ckpt-every"), default=d.ckpt_every)
    g.add_argument("--keep-checkpoints", type=nonneg_int("--keep-checkpoints"), default=d.keep_checkpoints,
                   help="0 = keep all")
    g.add_argument("--sample-every", type=nonneg_int("--sample-every"), default=d.sample_every)
    g.add_argument("--sample-sampler", default=d.sample_sampler, choices=list(SAMPLERS),
                   help="sampler of the periodic sample grids")
    g.add_argument("--sample-steps", type=positive_int("--sample-steps"), default=d.sample_steps)
    g.add_argument("--sample-cfg-scale", type=finite_float("--sample-cfg-scale", 0), default=d.sample_cfg_scale)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--tune", choices=["auto", "on", "off"], default="auto",
                   help="after training, let the run choose its own sampling setting (ditkit tune: ~10%% of the "
                        "training time, kept in RUN/sampling.json); auto: for MNIST-shaped runs of >= 2 minutes")


def _add_hardware(g, d) -> None:
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="bf16 = bf16 autocast for the matrix products (CUDA; CPUs with AMX or AVX-512 BF16); "
                        "auto = bf16 where the hardware runs it natively, else fp32")
    g.add_argument("--threads", type=positive_int("--threads"), help="CPU threads (default: torch's)")
    g.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="torch.compile the training step (needs a C++ compiler): ~24%% more steps/s on an AVX-512 "
                        "CPU after ~35 s of compilation, none on an AVX2-only one; one process only. Default: on for "
                        "CPU runs of one process that last >= 3 minutes (or >= 3000 steps) where a compiler works "
                        "and the CPU has AVX-512, off otherwise")
    g.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward instead of keeping them: the same "
                        "losses with less memory, at the cost of one more forward of the blocks a step (DiT)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="--batch-size auto takes at most the largest batch whose training step fits SIZE (e.g. "
                        "4GiB), measured by a short probe; default: half the RAM (CPU) or 90%% of the free memory "
                        "(GPU)")


def _cmd_train(args) -> int:
    from .config import TrainConfig
    from .loop import train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.max_steps is None and args.epochs is None and args.max_minutes is None:
        fields["epochs"] = 1.0
    run = train(TrainConfig(**fields), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per rank
        t = json.loads((run / "config.json").read_text())["train"]  # what --batch-size / --lr auto became
        print(f"run folder: {run} (batch {t['batch_size']}, lr {t['lr']:.3g})")
        _tune_after_training(run, args.tune)
    return 0


AUTO_TUNE_MIN_S = 120.0  # shorter runs are tests and smoke runs: their samples are not worth a minute of tuning


def _tune_after_training(run, mode: str) -> None:
    """`--tune`: the run chooses its own sampling setting (ditkit.tune) once training is done."""
    if mode == "off":
        return
    from ..errors import DitkitError
    from ..runs import load_model, write_tuned_setting
    from ..tune import not_judged, training_seconds, tune_model

    model = load_model(run)
    if mode == "auto":
        trained = training_seconds(model) or 0.0
        if trained < AUTO_TUNE_MIN_S or not_judged(model.config) \
                or model.config.get("world_size", 1) != 1 or model.text_encoder is not None:
            return  # (a text model: tuning reads class labels)
    print("choosing the run's sampling setting (ditkit tune; --tune off skips it) ...")
    try:
        rec = tune_model(model, log_fn=print)
    except DitkitError as e:  # the run itself is trained and saved: say why it has no tuned setting, and go on
        if mode == "on":
            raise
        print(f"note: the run samples with the untuned default ({e})")
        return
    write_tuned_setting(run, rec)
    print(f"sampling setting: {rec['name']} (kept in {run}/sampling.json; `ditkit sample` uses it)")
