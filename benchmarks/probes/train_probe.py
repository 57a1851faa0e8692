"""Probes of training changes that are not (yet) library options, measured per CPU-minute: runs `ditkit train`
with one piece swapped for this process only.

    python benchmarks/probes/train_probe.py --contrastive 0.05 -- --out runs/exp/dfm --max-minutes 10 --no-progress \
        --sample-every 0 --ckpt-every 0
    python benchmarks/probes/train_probe.py --ema-gammas 4,16 -- --out runs/exp/emap ...

(Round 9's Muon probe is the library's `ditkit train --optimizer muon` since round 39.)
--ema-gammas G1,G2: also keep power-function EMAs (Karras et al. 2024, EDM2: decay (1 - 1/n)^(G + 1) at
  update n), each written at the end as a sibling run OUT_emaG whose EMA weights are that average. (The run's
  own EMA, 0.999 with the (1 + n) / (10 + n) warm-up, is at its warm-up cap for the first ~9,000 steps: a
  power-function EMA with G ~ 8, sigma_rel ~ 0.09.)
--contrastive L: contrastive flow matching (Stoica et al. 2025, "Contrastive Flow Matching"): the loss
  subtracts L times the squared distance between the prediction and another batch row's target (the batch
  rolled by one), pushing each condition's flow away from the others.
"""

from __future__ import annotations

import argparse

import torch

from ditkit import cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contrastive", type=float, default=0.0)
    ap.add_argument("--ema-gammas", default="")
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]

    import ditkit.train.loop as loop
    from ditkit.objectives.base import drop_labels
    from ditkit.objectives.interpolant import TIME_SCALE, InterpolantObjective
    real_loss = InterpolantObjective.loss
    if args.contrastive:
        lam = args.contrastive

        def loss(self, net, x0, cond, noise=None, generator=None, reference=None):
            assert self.prediction == "velocity" and self.train_guidance == 1 and self.loss_weighting is None
            if reference is not None:
                raise SystemExit("--contrastive: train with --stable-target 0 (the probe uses the plain target)")
            B = x0.shape[0]
            t64, eps = noise["t"], noise["eps"].to(x0.device, x0.dtype)
            cond = drop_labels(cond, noise["drop"])
            p = self.path
            col = lambda f: f(t64).to(x0.device, x0.dtype).view(B, 1, 1, 1)  # noqa: E731
            x_t = col(p.alpha) * x0 + col(p.s) * eps
            out = net(x_t, (t64 * TIME_SCALE).to(x0.device, x0.dtype), cond.to(x0.device))
            target = col(p.d_alpha) * x0 + col(p.d_s) * eps
            negative = target.roll(1, 0)
            return ((out - target).pow(2).flatten(1).mean(1)
                    - lam * (out - negative).pow(2).flatten(1).mean(1)).mean()

        InterpolantObjective.loss = loss

    gammas = [float(g) for g in args.ema_gammas.split(",") if g]
    real_ema = loop.EMA
    extras = {}

    class MultiEMA(real_ema):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            import copy
            for g in gammas:
                extras[g] = copy.deepcopy(self.model)

        @torch.no_grad()
        def update(self, model):
            n = self.num_updates + 1
            params = [p.detach() for p in model.parameters()]
            for g, m in extras.items():
                d = (1 - 1 / n) ** (g + 1)
                torch._foreach_lerp_(list(m.parameters()), params, 1.0 - d)
            super().update(model)

    if gammas:
        loop.EMA = MultiEMA
    try:
        cli.main(["train", *train_args])
    finally:
        InterpolantObjective.loss = real_loss
        loop.EMA = real_ema
    if gammas:
        import shutil
        from pathlib import Path

        from ditkit.runs import _save_tensors, latest_checkpoint
        out = Path(train_args[train_args.index("--out") + 1])
        for g, m in extras.items():
            dst = Path(f"{out}_ema{g:g}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(out, dst)
            _save_tensors(m.state_dict(), latest_checkpoint(dst) / "ema.safetensors")
            print(f"power EMA gamma {g:g}: {dst}", flush=True)


if __name__ == "__main__":
    main()
