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

    from ..finetune import register_cli

    register_cli(sub, parser_class)


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
