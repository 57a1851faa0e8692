"""The training objective's loss on the 10,000 held-out MNIST test digits, for runs or checkpoints: the same
draws of training times and noise for every model (`ditkit.evaluate.held_out_loss`), so two models compare
paired, with far less noise than FID's. It does not see guidance or the sampler.

    python benchmarks/held_out_loss.py RUN_OR_CHECKPOINT [...] [--repeats 2] [--bins 8] [--weights ema|model]

Prints one line per model (the loss, its standard error over digits, and the loss in equal-count bins of
the training time, low noise first), then the same as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--weights", default="ema", choices=["ema", "model"])
    args = ap.parse_args()

    from ditkit.data import load_dataset
    from ditkit.errors import DitkitError
    from ditkit.evaluate import held_out_loss
    from ditkit.sampling import load_model

    test = load_dataset("mnist", "test")
    rows = []
    for ck in args.ckpts:
        try:
            model = load_model(ck, weights=args.weights)
            res = held_out_loss(model, test.images, test.labels, repeats=args.repeats, bins=args.bins,
                                seed=args.seed)
        except DitkitError as e:
            sys.exit(f"{ck}: {e}")
        res.update(ckpt=ck, step=model.step)
        rows.append(res)
        bins = " ".join(f"{b['loss']:.4f}" for b in res["bins"])
        print(f"{ck}  step {model.step:6d}  loss {res['loss']:.5f} ± {res['stderr']:.5f}  bins {bins}", flush=True)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
