"""Probe: CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
Models") on a linear-interpolant run, through `ditkit eval` unchanged.

CFG-Zero* guides in velocity space with the unconditional velocity first projected on the conditional one,
    v = s* v_u + w (v_c - s* v_u),   s* = <v_c, v_u> / |v_u|^2   (per image),
and ("zero-init") returns v = 0 for the first `--zero-steps` sampler steps. On the linear path the velocity
at x = x_t / alpha in sigma-space is (x_t - D) / t, proportional to u = alpha x - D (alpha from the model's
path), and t cancels in s*, so the wrapper works on u and maps back: D = alpha x - u. A zero velocity is
D = alpha x. Only the linear path: on the others the velocity is not proportional to u.

    python benchmarks/probes/cfg_zero_star.py --ckpt RUN_COPY [--zero-steps K] -- --cfg-scale 1.25 --num 3000 --compile

(Evaluate a copy of the run: the result file is named by the usual settings and would replace the plain
CFG one.)
"""

from __future__ import annotations

import argparse
import sys

import torch

import ditkit.sampling as sampling
from ditkit.cli import main as cli_main
from ditkit.condition import Condition


def cfg_zero_star(zero_steps: int):
    def guided(denoiser, scale, interval=None, schedule="constant"):
        w = float(scale)
        path = denoiser.path
        if path is None or path.name != "linear":
            raise SystemExit("cfg_zero_star.py: needs a model of the linear interpolant (ditkit train --objective linear)")
        seen: list[float] = []

        def fn(x, sigma, cond):
            B = x.shape[0]
            s0 = float(sigma.reshape(-1)[0])
            if s0 not in seen:
                seen.append(s0)
            alpha = path.alpha(path.t_of_sigma(sigma.double())).to(x.dtype).view(-1, 1, 1, 1)
            if len(seen) <= zero_steps:
                return alpha * x  # zero velocity
            out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Condition.cat(cond, cond.null()))
            u_c, u_u = alpha * x - out[:B], alpha * x - out[B:]
            dot = (u_c * u_u).flatten(1).sum(1)
            s = (dot / u_u.pow(2).flatten(1).sum(1).clamp_min(1e-12)).view(-1, 1, 1, 1)
            u = s * u_u + w * (u_c - s * u_u)
            return alpha * x - u

        return denoiser.wrap(fn)

    return guided


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    mine = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--zero-steps", type=int, default=0)
    a = p.parse_args(mine)
    sampling.guided = cfg_zero_star(a.zero_steps)
    sys.exit(cli_main(["eval", "--ckpt", a.ckpt, *rest]))


if __name__ == "__main__":
    main()
