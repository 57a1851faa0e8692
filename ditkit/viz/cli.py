"""`ditkit report RUN`: flags, then `ditkit.viz.report.build_report`. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from ..cli_args import finite_float, nonneg_int, positive_int, seed_int


def _at_least_5(name: str):
    """An integer >= 5 (a t-SNE of fewer points has no neighbourhoods to keep)."""
    parse_int = positive_int(name)

    def parse(v: str) -> int:
        x = parse_int(v)
        if x < 5:
            raise argparse.ArgumentTypeError(f"{name} must be >= 5, got {x}")
        return x
    return parse


def _int_list(name: str):
    def parse(v: str) -> list[int]:
        try:
            vals = [int(s) for s in v.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma list of steps like 0,3,6,9, got {v!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return vals
    return parse


def register(sub, parser_class) -> None:
    from ..samplers import SAMPLERS
    from .embeddings import FEATURE_KINDS
    from .report import ReportOptions

    d = ReportOptions()
    p = sub.add_parser("report", help="write RUN/report.html: curves, samples per checkpoint, evaluation, "
                                      "trajectory, attention maps, t-SNE (opens offline)")
    p.add_argument("run", help="run folder made by `ditkit train`")
    p.add_argument("--out", help="report file (default: RUN/report.html; figures go to report_files/ beside it)")
    g = p.add_argument_group("sampling (checkpoint grid, trajectory)")
    g.add_argument("--sampler", default=d.sampler, choices=list(SAMPLERS), help="default: %(default)s")
    g.add_argument("--steps", type=positive_int("--steps"), default=d.steps,
                   help="sampler steps of the checkpoint grid and the trajectory (default: %(default)s)")
    g.add_argument("--cfg-scale", type=finite_float("--cfg-scale", 0),
                   help="guidance scale, 1 = off (default: the run's training-time sample_cfg_scale)")
    g.add_argument("--num-per-ckpt", type=positive_int("--num-per-ckpt"), default=d.num_per_ckpt,
                   help="images per checkpoint row (default: %(default)s)")
    g.add_argument("--max-checkpoints", type=positive_int("--max-checkpoints"), default=d.max_checkpoints,
                   help="rows at most: evenly spaced checkpoints, first and last included (default: %(default)s)")
    g.add_argument("--seed", type=seed_int("--seed"), default=d.seed, help="default: %(default)s")
    g.add_argument("--weights", default=d.weights, choices=["ema", "model"], help="default: %(default)s")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--threads", type=positive_int("--threads"),
                   help="CPU threads for torch and the t-SNE (default: the libraries' own choice)")
    g.add_argument("--traj-steps", type=_int_list("--traj-steps"),
                   help="sampler steps shown in the trajectory, e.g. 0,3,6,9 (default: evenly spaced)")
    a = p.add_argument_group("attention and features (newest checkpoint)")
    a.add_argument("--image", type=nonneg_int("--image"), default=d.image,
                   help="which image of the newest row (0 .. num-per-ckpt-1) the trajectory and attention show "
                        "(default: %(default)s)")
    a.add_argument("--layer", type=nonneg_int("--layer"), help="attention layer (default: the last)")
    a.add_argument("--head", type=nonneg_int("--head"), default=d.head,
                   help="attention head drawn as chosen (all heads and their mean are drawn; default: %(default)s)")
    a.add_argument("--query", type=nonneg_int("--query"),
                   help="query patch, row-major on the patch grid (default: the patch with the most ink)")
    a.add_argument("--attn-sigma", type=finite_float("--attn-sigma", 0, True), default=d.attn_sigma,
                   help="noise level at which the network looks at the image (default: %(default)s)")
    a.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE")
    a.add_argument("--tsne-features", default=d.tsne_features, choices=list(FEATURE_KINDS),
                   help="final: pooled tokens before the final layer; patch: patch embeddings (default: %(default)s)")
    a.add_argument("--tsne-points", type=_at_least_5("--tsne-points"), default=d.tsne_points,
                   help="images in the t-SNE (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import ReportOptions, build_report

    opts = ReportOptions(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                         num_per_ckpt=args.num_per_ckpt, max_checkpoints=args.max_checkpoints, seed=args.seed,
                         weights=args.weights, device=args.device, image=args.image, layer=args.layer,
                         head=args.head, query=args.query, attn_sigma=args.attn_sigma, traj_steps=args.traj_steps,
                         tsne=args.tsne, tsne_features=args.tsne_features, tsne_points=args.tsne_points)
    log = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr))
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency: caps its OpenMP/BLAS pools

        torch.set_num_threads(args.threads)
        with threadpool_limits(limits=args.threads):
            rep = build_report(args.run, out=args.out, options=opts, log=log)
    else:
        rep = build_report(args.run, out=args.out, options=opts, log=log)
    for n in rep.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {rep.path} ({len(rep.figures)} figures, {rep.total_seconds:.1f} s)")
    return 0
