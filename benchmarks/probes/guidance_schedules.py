"""Guidance along the noise levels: where classifier-free guidance acts, and what that does to FID and
class accuracy (ditkit's MNIST classifier), on one run, with the same seeds and labels for every row.

    python benchmarks/probes/guidance_schedules.py --ckpt runs/exp/base --rows constant:1.35,ramp:1.5,low1:1.6,high1:1.5,rampdown:1.35

Row kinds (S the scale; t = sigma / (1 + sigma) on the linear path):
  constant, ramp  - the library's schedules (`--cfg-schedule`): S everywhere; 1 + 2 (S - 1) / (1 + sigma)
  rampdown        - the mirror of ramp: 1 + 2 (S - 1) sigma / (1 + sigma), most guidance at high noise
  lowX / highX    - S only where sigma <= X / sigma >= X, no guidance elsewhere
  apgE            - adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of
                    high guidance scales"): the guidance D_c - D_u split, per image, into its part along D_c and
                    the rest; D_c + (S - 1) (rest + E * along). apg1 is plain CFG.
The exploratory kinds replace `ditkit.sampling.guided` for the run of this script only.
"""

from __future__ import annotations

import argparse
import json

import torch

import ditkit.sampling as S
from ditkit.condition import Condition
from ditkit.evaluate import evaluate_checkpoint

LIBRARY = ("constant", "ramp")


def factor(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    """The share of (S - 1) applied at each image's sigma."""
    if kind == "rampdown":
        return 2 * sigma / (1 + sigma)
    if kind.startswith("low"):
        return (sigma <= float(kind[3:])).to(sigma.dtype)
    if kind.startswith("high"):
        return (sigma >= float(kind[4:])).to(sigma.dtype)
    raise SystemExit(f"unknown row kind {kind!r}: constant, ramp, rampdown, lowX, highX, apgE")


def exploratory_guided(kind: str):
    def guided(denoiser, scale, interval=None, schedule="constant"):
        def fn(x, sigma, cond: Condition):
            B = x.shape[0]
            out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Condition.cat(cond, cond.null()))
            d_c, d_u = out[:B], out[B:]
            if kind.startswith("apg"):
                eta = float(kind[3:])
                delta = (d_c - d_u).to(torch.float64).flatten(1)
                unit = torch.nn.functional.normalize(d_c.to(torch.float64).flatten(1), dim=1)
                along = (delta * unit).sum(1, keepdim=True) * unit
                upd = (delta - along) + eta * along
                return (d_c.to(torch.float64) + (float(scale) - 1) * upd.view_as(d_c)).to(x.dtype)
            w = 1 + (torch.as_tensor(scale, dtype=torch.float64) - 1) * factor(kind, sigma.to(torch.float64))
            return d_u + w.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * (d_c - d_u)
        return denoiser.wrap(fn)
    return guided


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--rows", required=True, help="KIND:SCALE,... (see above)")
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--weights", default="ema", choices=("ema", "model"))
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    library_guided = S.guided
    for row in args.rows.split(","):
        kind, scale = row.split(":")
        S.guided = library_guided if kind in LIBRARY else exploratory_guided(kind)
        res = evaluate_checkpoint(args.ckpt, num=args.num, cfg_scale=float(scale), compile=not args.no_compile,
                                  steps=args.steps, weights=args.weights,
                                  write=False, cfg_schedule=kind if kind in LIBRARY else "constant")
        print(json.dumps(dict(ckpt=args.ckpt, kind=kind, scale=float(scale), steps=args.steps, weights=args.weights, acc=res["class_accuracy"]["value"],
                              fid=res["fid"]["value"], fid_floor=res["fid_floor"], fid_ratio=res["fid_ratio"])),
              flush=True)
    S.guided = library_guided


if __name__ == "__main__":
    main()
