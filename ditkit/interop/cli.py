"""`ditkit export`, `ditkit import`, `ditkit finetune`, `ditkit merge-lora`: thin CLI over ditkit.interop and
ditkit.finetune (parse, call, print)."""

from __future__ import annotations

import argparse

EXPORT_FORMATS = ("diffusers",)


def register(sub, parser_class) -> None:
    p = sub.add_parser("export", help="write a run's network in another library's format (diffusers' "
                                      "DiTTransformer2DModel), checked to give the same outputs")
    p.add_argument("run", metavar="RUN", help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--format", default="diffusers", choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="make a ditkit run of a diffusers DiT (a DiTTransformer2DModel folder, or a "
                                      "pipeline folder with transformer/, vae/ and scheduler/)")
    p.add_argument("src", metavar="DIR", help="the diffusers folder (on disk; nothing is downloaded)")
    p.add_argument("--out", required=True, help="the run folder to write (must not exist, or be empty)")
    p.set_defaults(func=_cmd_import)

    _register_finetune(sub)


def _register_finetune(sub) -> None:
    from ..cli_args import finite_float as _float, nonneg_int as _nonneg_int, or_auto as _or_auto, \
        positive_int as _positive_int, seed_int
    from ..finetune import DEFAULT_LORA_TARGETS, FINETUNE_DEFAULTS, FINETUNE_LR, LORA_TARGETS
    from ..train.optim import OPTIMIZERS

    p = sub.add_parser("finetune", help="fine-tune a trained DiT on an image folder (class sub-folders, new "
                                        "classes welcome): all weights, the later blocks only, or LoRA",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="base", metavar="RUN_OR_CHECKPOINT", help="the trained run (or checkpoint) to start from")
    p.add_argument("--dataset", metavar="FOLDER", help="FOLDER/<class>/*.png (classes matched to the base's by "
                   "name; new ones are added) or FOLDER/*.png; optional FOLDER/captions.jsonl or a .txt per image; or mnist")
    p.add_argument("--out", required=True, help="the new run folder")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its last checkpoint")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="the base's weights to start from")
    p.add_argument("--freeze-blocks", type=_nonneg_int("--freeze-blocks"), default=0, metavar="K",
                   help="freeze the patch embedding and the first K blocks (0 = train every weight)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) and the label table only; "
                   "the adapter is also saved on its own in RUN/adapter")
    p.add_argument("--lora-rank", type=_positive_int("--lora-rank"), default=8)
    p.add_argument("--lora-alpha", type=_float("--lora-alpha", 0, True), default=16.0)
    p.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help=f"comma-separated, of {', '.join(LORA_TARGETS)} (the blocks' maps)")
    p.add_argument("--time-freq-shift", type=int, choices=[0, 1],
                   help="the timestep embedding's frequencies: 1 = diffusers' (makes the model exportable with "
                        "ditkit export --format diffusers), 0 = facebookresearch/DiT's (default: the base's)")
    p.add_argument("--lr", type=_or_auto(_float("--lr", 0, True)), default="auto", metavar="LR|auto",
                   help=f"auto: {FINETUNE_LR['full']:g} (full, --freeze-blocks), {FINETUNE_LR['lora']:g} (--lora)")
    p.add_argument("--warmup-steps", type=_nonneg_int("--warmup-steps"), default=FINETUNE_DEFAULTS["warmup_steps"])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=FINETUNE_DEFAULTS["optimizer"])
    p.add_argument("--batch-size", type=_or_auto(_positive_int("--batch-size")), default="auto", metavar="N|auto")
    p.add_argument("--max-steps", type=_positive_int("--max-steps"))
    p.add_argument("--epochs", type=_float("--epochs", 0, True), help="default 10 when no length is given")
    p.add_argument("--max-minutes", type=_float("--max-minutes", 0, True))
    p.add_argument("--ema-decay", type=_float("--ema-decay", 0))
    p.add_argument("--seed", type=seed_int())
    p.add_argument("--log-every", type=_nonneg_int("--log-every"))
    p.add_argument("--ckpt-every", type=_nonneg_int("--ckpt-every"))
    p.add_argument("--sample-every", type=_nonneg_int("--sample-every"))
    p.add_argument("--sample-steps", type=_positive_int("--sample-steps"), help="steps of the grids' sampler")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=_positive_int("--threads"))
    p.add_argument("--compile", dest="compile", action="store_const", const=True, default=None)
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("merge-lora", help="merge a LoRA fine-tune's adapter into its base: a plain run")
    p.add_argument("--adapter", required=True, help="the fine-tune run folder, or its adapter/ folder")
    p.add_argument("--base", help="the base run or checkpoint (default: the one the adapter records); it must "
                                  "hold the weights the adapter was trained on")
    p.add_argument("--out", required=True, help="the new run folder")
    p.set_defaults(func=_cmd_merge)


TRAIN_SETTINGS = ("lr", "warmup_steps", "optimizer", "batch_size", "max_steps", "epochs", "max_minutes", "ema_decay",
                  "seed", "log_every", "ckpt_every", "sample_every", "sample_steps", "device", "precision", "threads", "compile",
                  "progress")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..finetune import finetune, lora_section, resume_finetune

    settings = {k: getattr(args, k) for k in TRAIN_SETTINGS}
    if args.resume:
        if args.base or args.dataset:
            raise UsageError("--resume continues the fine-tune in --out with its recorded --from and --dataset; "
                             "give neither")
        run = resume_finetune(args.out, **{k: settings[k] for k in ("max_steps", "epochs", "max_minutes", "progress")})
    else:
        if not args.base or not args.dataset:
            raise UsageError("give --from RUN_OR_CHECKPOINT and --dataset FOLDER (or --resume)")
        lora = lora_section(args.lora_rank, args.lora_alpha, tuple(t.strip() for t in args.lora_targets.split(",")
                                                                   if t.strip())) if args.lora else None
        run = finetune(args.base, args.dataset, args.out, weights=args.weights, freeze_blocks=args.freeze_blocks,
                       lora=lora, time_freq_shift=args.time_freq_shift, **settings)
    print(f"run folder: {run}" + (f" (adapter: {run / 'adapter'})" if (run / "adapter").exists() else ""))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..finetune import merge_lora

    out = merge_lora(args.adapter, args.out, base=args.base)
    print(f"run folder: {out} (base with the adapter merged in)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .diffusers import export_diffusers

    res = export_diffusers(args.run, args.out, weights=args.weights)
    print(f"wrote {res['out']} (diffusers DiTTransformer2DModel, step {res['step']}): max |diffusers - ditkit| "
          f"= {res['max_abs_diff']:.2e} on probe inputs")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .diffusers import import_diffusers

    res = import_diffusers(args.src, args.out)
    print(f"wrote run {res['out']} ({'latent, decoded by its VAE' if res['latent'] else 'pixel space'}; objective "
          f"from {res['objective_from']}): max |ditkit - diffusers| = {res['max_abs_diff']:.2e} on probe inputs")
    return 0
