"""Probes of training changes that are not (yet) library options, measured per CPU-minute: runs `ditkit train`
with one piece swapped for this process only.

    python benchmarks/train_probe.py --muon -- --out runs/exp/muon --max-minutes 10 --no-progress \
        --sample-every 0 --ckpt-every 0
    python benchmarks/train_probe.py --contrastive 0.05 -- --out runs/exp/dfm ...

--muon: Muon (orthogonalised momentum, torch.optim.Muon) on the DiT blocks' weight matrices instead of AdamW.
--ema-gammas G1,G2: also keep power-function EMAs (Karras et al. 2024, EDM2: decay (1 - 1/n)^(G + 1) at
  update n), each written at the end as a sibling run OUT_emaG whose EMA weights are that average. (The run's
  own EMA, 0.999 with the (1 + n) / (10 + n) warm-up, is at its warm-up cap for the first ~9,000 steps: a
  power-function EMA with G ~ 8, sigma_rel ~ 0.09.)
--contrastive L: contrastive flow matching (Stoica et al. 2025, "Contrastive Flow Matching"): the loss
  subtracts L times the squared distance between the prediction and another batch row's target (the batch
  rolled by one), pushing each condition's flow away from the others.

Muon takes the 2-D weights inside the transformer blocks (attention and MLP; with --muon-modulation also the
adaLN modulations); everything else (embeddings, the output layer, biases, norms) stays on AdamW. The Muon lr
uses "match_rms_adamw" (Moonshot): its update has AdamW's RMS, so the same lr is a fair starting point; the
run's warm-up and decay scale both optimisers alike.
"""

from __future__ import annotations

import argparse

import torch

from ditkit import cli

REAL_ADAMW = torch.optim.AdamW


class Combo:
    """AdamW and Muon behind one optimiser face: param_groups are the inner optimisers' own dicts, so the
    loop's g["lr"] = ... reaches both; state_dict numbers AdamW's parameters first, then Muon's."""

    def __init__(self, adam: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.adam, self.muon = adam, muon
        self.n_adam = sum(len(g["params"]) for g in adam.param_groups)
        self.param_groups = adam.param_groups + muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.adam.step()
        self.muon.step()

    def state_dict(self):
        a, m = self.adam.state_dict(), self.muon.state_dict()
        state = dict(a["state"])
        state.update({k + self.n_adam: v for k, v in m["state"].items()})
        groups = list(a["param_groups"]) + [dict(g, params=[p + self.n_adam for p in g["params"]])
                                            for g in m["param_groups"]]
        return {"state": state, "param_groups": groups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--muon", action="store_true")
    ap.add_argument("--contrastive", type=float, default=0.0)
    ap.add_argument("--ema-gammas", default="")
    ap.add_argument("--muon-modulation", action="store_true")
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]

    def make(params, lr, betas, weight_decay, fused):
        params = list(params)
        model = make.model
        muon_ids = set()
        for name, p in model.named_parameters():
            if p.ndim == 2 and name.startswith("blocks.") and (args.muon_modulation or "adaLN" not in name):
                muon_ids.add(id(p))
        adam_p = [p for p in params if id(p) not in muon_ids]
        muon_p = [p for p in params if id(p) in muon_ids]
        print(f"optimizer probe: {len(muon_p)} matrices on Muon "
              f"({sum(p.numel() for p in muon_p)} weights), {len(adam_p)} tensors on AdamW", flush=True)
        adam = REAL_ADAMW(adam_p, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        muon = torch.optim.Muon(muon_p, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        return Combo(adam, muon)

    import ditkit.train.loop as loop
    from ditkit.objectives.base import drop_labels
    from ditkit.objectives.interpolant import TIME_SCALE, InterpolantObjective
    real_build = loop.build_model
    real_loss = InterpolantObjective.loss
    if args.contrastive:
        lam = args.contrastive

        def loss(self, net, x0, cond, noise=None, generator=None):
            assert self.prediction == "velocity" and self.train_guidance == 1 and self.loss_weighting is None
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

    def build_model(cfg):
        m = real_build(cfg)
        make.model = m
        return m

    loop.build_model = build_model
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
    if args.muon:
        torch.optim.AdamW = make
    try:
        cli.main(["train", *train_args])
    finally:
        torch.optim.AdamW = REAL_ADAMW
        loop.build_model = real_build
        InterpolantObjective.loss = real_loss
        loop.EMA = real_ema
    if gammas:
        import shutil
        from pathlib import Path

        from ditkit.train.checkpoint import _save_tensors, latest_checkpoint
        out = Path(train_args[train_args.index("--out") + 1])
        for g, m in extras.items():
            dst = Path(f"{out}_ema{g:g}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(out, dst)
            _save_tensors(m.state_dict(), latest_checkpoint(dst) / "ema.safetensors")
            print(f"power EMA gamma {g:g}: {dst}", flush=True)


if __name__ == "__main__":
    main()
