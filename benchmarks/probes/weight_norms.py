"""How large a run's weights have grown, checkpoint by checkpoint: the Frobenius norm of the matrices that
`--optimizer muon` trains (`ditkit.train.optim.muon_parameters`: attention's and the MLP's inside the
blocks), of the blocks' adaLN modulations, and of the class-label table. Round 40 of docs/BENCHMARKS.md
reads Muon's runs with and without weight decay on it.

    python benchmarks/probes/weight_norms.py RUN_OR_CHECKPOINT [...] [--weights ema|model]

A run folder reads its latest checkpoint; give checkpoint folders (RUN/checkpoints/step_*) for a run's
course.
"""

from __future__ import annotations

import argparse
import math
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--weights", default="ema", choices=["ema", "model"])
    args = ap.parse_args()

    import torch

    from ditkit.errors import DitkitError
    from ditkit.sampling import load_model
    from ditkit.train.optim import muon_parameters

    def norm(tensors) -> float:  # nan where a model has none of them (no blocks, no class labels)
        return float(torch.cat([t.detach().double().flatten() for t in tensors]).norm()) if tensors else math.nan

    for ck in args.ckpts:
        try:
            model = load_model(ck, weights=args.weights)
        except DitkitError as e:
            sys.exit(f"{ck}: {e}")
        params = dict(model.net.named_parameters())
        hidden = [params[n] for n in muon_parameters(model.net)]
        adaln = [p for n, p in params.items() if "adaLN" in n and p.ndim == 2]
        labels = [p for n, p in params.items() if n.startswith("y_embedder.")]
        print(f"{ck}  step {model.step:6d}  hidden matrices {norm(hidden):7.1f}  adaLN {norm(adaln):6.1f}  "
              f"label table {norm(labels):5.2f}")


if __name__ == "__main__":
    main()
