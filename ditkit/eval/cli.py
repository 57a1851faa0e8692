"""`ditkit eval`: thin CLI over ditkit.evaluate and ditkit.eval.classifier."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub, parser_class) -> None:
    from ..cli import _float, _positive_int

    p = sub.add_parser("eval", help="FID and class accuracy of a run or of an .npz of samples; "
                                    "'ditkit eval train-classifier' retrains the judge",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", nargs="?", choices=["train-classifier"], help="retrain the MNIST classifier")
    p.add_argument("--ckpt", help="run folder or checkpoint folder to sample from")
    p.add_argument("--samples", help="an .npz with images (uint8) and optional labels")
    from ..sampling import DEFAULT_SAMPLER, DEFAULT_STEPS
    from ..samplers import SAMPLERS

    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS))
    p.add_argument("--steps", type=_positive_int("--steps"), default=DEFAULT_STEPS)
    p.add_argument("--spacing")
    from ..cli import _add_compile_flag, _add_guidance_flags, _add_precision_flag, _add_sampler_option_flag

    _add_sampler_option_flag(p)
    _add_guidance_flags(p)
    _add_precision_flag(p)
    _add_compile_flag(p)
    p.add_argument("--labels", default="prior",
                   help="'prior': the training data's class mix, as real digits have it (exact counts); "
                        "'all': balanced; or a class id (3) or list (0,1,2)")
    p.add_argument("--num", type=_positive_int("--num"), default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=250)
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=5, help="train-classifier: epochs")
    p.add_argument("--out", help="train-classifier: where to write the weights (.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UsageError

    if args.action == "train-classifier":
        from ..eval.classifier import train_classifier

        if not args.out:
            raise UsageError("train-classifier needs --out FILE.safetensors (the shipped weights stay untouched)")
        model, acc = train_classifier(epochs=args.epochs, out=args.out)
        print(f"test accuracy {100 * acc:.2f}% on the 10,000 MNIST test digits; weights {args.out} "
              f"(sha256 {model.sha256})")
        return 0
    if bool(args.ckpt) == bool(args.samples):
        raise UsageError("give exactly one of --ckpt RUN (sample, then evaluate) or --samples FILE.npz")
    from ..evaluate import evaluate_checkpoint, evaluate_samples, format_result, load_samples

    if args.samples:
        images, labels = load_samples(args.samples)
        res = evaluate_samples(images, labels)
    else:
        from tqdm import tqdm

        with tqdm(total=args.num, unit="img", disable=not sys.stderr.isatty()) as bar:
            res = evaluate_checkpoint(args.ckpt, num=args.num, sampler=args.sampler, steps=args.steps,
                                      cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                                      labels=args.labels,
                                      spacing=args.spacing, weights=args.weights, device=args.device,
                                      sampler_options=dict(args.sampler_option), cfg_schedule=args.cfg_schedule,
                                      autoguidance=args.autoguidance, guide=args.guide, precision=args.precision,
                                      compile=args.compile, progress=bar.update, reject=args.reject,
                                      guidance_interval=args.guidance_interval)
    print(json.dumps(res, indent=2, default=str) if args.json else format_result(res))
    return 0
