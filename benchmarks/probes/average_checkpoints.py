"""A run folder whose weights are the mean of some checkpoints' EMA (or raw) weights of another run: a
longer average than the EMA, evaluated like any run (`ditkit eval --ckpt OUT`).

    python benchmarks/probes/average_checkpoints.py --run runs/qvm/ag30 --steps 25500,27200,28900,28974 --out /tmp/avg4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", required=True, help="checkpoint steps, comma-separated")
    ap.add_argument("--weights", default="ema", choices=["ema", "model"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src, out = Path(args.run), Path(args.out)
    steps = [int(s) for s in args.steps.split(",")]
    ckpts = [src / "checkpoints" / f"step_{s:07d}" for s in steps]
    weights = [load_file(str(c / f"{args.weights}.safetensors")) for c in ckpts]
    mean = {k: sum(w[k].double() for w in weights).div(len(weights)).to(weights[0][k].dtype) for k in weights[0]}
    dst = out / "checkpoints" / ckpts[-1].name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / "config.json")
    shutil.copy(ckpts[-1] / "state.json", dst / "state.json")
    for name in ("ema", "model"):
        save_file(mean, str(dst / f"{name}.safetensors"))
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"path": dst.name, "step": steps[-1]}))
    print(f"{out}: the mean of the {args.weights} weights of steps {steps}")


if __name__ == "__main__":
    main()
