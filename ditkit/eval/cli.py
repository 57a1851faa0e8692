"""`ditkit eval`: thin CLI over ditkit.evaluate and ditkit.eval.classifier."""

from __future__ import annotations

import argparse
import json
import sys

# below this many images FID's bias and spread swamp any difference between models (docs/BENCHMARKS.md)
FID_MIN_MEANINGFUL_N = 1000


def register(sub, parser_class) -> None:
    from ..cli import add_model_flags
    from ..cli_args import add_sampling_flags, positive_int, seed_int

    p = sub.add_parser("eval", help="FID and class accuracy of a run or of an .npz of samples; "
                                    "'ditkit eval train-classifier' retrains the judge",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", nargs="?", choices=["train-classifier"], help="retrain the MNIST classifier")
    p.add_argument("--ckpt", help="run folder or checkpoint folder to sample from")
    p.add_argument("--samples", help="an .npz with images (uint8) and optional labels")
    p.add_argument("--labels", default="prior",
                   help="'prior': the training data's class mix, as real digits have it (exact counts); "
                        "'all': balanced; or a class id (3) or list (0,1,2)")
    p.add_argument("--num", type=positive_int("--num"), default=10000)
    p.add_argument("--seed", type=seed_int(), default=0)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=250)
    p.add_argument("--prompts", choices=["held-out"],
                   help="text models: prompt adherence on the held-out prompts (digit accuracy, FID, thin/bold "
                        "and left/right slant in seed-matched pairs) instead of --labels and --num")
    p.add_argument("--per-prompt", type=positive_int("--per-prompt"), default=3,
                   help="--prompts: images per prompt (the same seeds for every prompt)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--epochs", type=positive_int("--epochs"), default=5, help="train-classifier: epochs")
    p.add_argument("--out", help="train-classifier: where to write the weights (.safetensors)")
    add_sampling_flags(p)
    add_model_flags(p)
    p.set_defaults(func=run)


def small_n_warning(n: int) -> str | None:
    """A warning line when `n` images are too few for FID to mean anything."""
    if n >= FID_MIN_MEANINGFUL_N:
        return None
    return (f"warning: FID of only {n} images is dominated by its small-sample bias and spread; compare models "
            f"at n >= {FID_MIN_MEANINGFUL_N} (3,000 or more for small differences)")


def _prompt_adherence(args) -> int:
    """`ditkit eval --ckpt RUN --prompts held-out` (ditkit.text.adherence)."""
    from ..cli_args import sampling_settings_from_args
    from ..errors import UsageError
    from ..runs import load_model
    from ..text.adherence import format_adherence, prompt_adherence

    if not args.ckpt:
        raise UsageError("--prompts held-out: give --ckpt RUN (a text model's run folder)")
    model = load_model(args.ckpt, weights=args.weights, device=args.device, guide=args.guide,
                       precision=args.precision, compile=args.compile)
    res = prompt_adherence(model, sampling_settings_from_args(args, model), per_prompt=args.per_prompt,
                           seed=args.seed, batch_size=args.batch_size)
    print(json.dumps(res, indent=2, default=str) if args.json else format_adherence(res))
    return 0


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

    if args.prompts:
        return _prompt_adherence(args)
    if args.samples:
        images, labels = load_samples(args.samples)
        res = evaluate_samples(images, labels)
    else:
        from tqdm import tqdm

        from ..cli_args import sampling_settings_from_args
        from ..runs import load_model

        # load once to resolve the settings (the run's tuned one, the flags over it) before any sampling
        model = load_model(args.ckpt, weights=args.weights, device=args.device, guide=args.guide,
                           precision=args.precision, compile=False, quantize=args.quantize)
        settings = sampling_settings_from_args(args, model)
        del model
        with tqdm(total=args.num, unit="img", disable=not sys.stderr.isatty()) as bar:
            res = evaluate_checkpoint(args.ckpt, settings, num=args.num, seed=args.seed, batch_size=args.batch_size,
                                      labels=args.labels, weights=args.weights, device=args.device,
                                      guide=args.guide, precision=args.precision, compile=args.compile,
                                      quantize=args.quantize,
                                      progress=bar.update)
    warning = small_n_warning(int(res["n"]))
    if warning and not args.json:
        print(warning, file=sys.stderr)
    if warning:
        res["warning"] = warning
    print(json.dumps(res, indent=2, default=str) if args.json else format_result(res))
    return 0
