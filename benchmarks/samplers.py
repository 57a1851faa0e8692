"""Steps versus quality: FID, class accuracy and wall time of every sampler at several NFE budgets, and
DDPM ancestral at 1000 steps, on one trained model with the same seeds and labels throughout.

    python benchmarks/samplers.py --ckpt runs/demo [--num 1000] [--nfe 5,10,20,50,100] [--cfg-scale 1]

Writes docs/bench/samplers.json (--out), a markdown table on stdout and docs/bench/samplers_fid_vs_nfe.png
(the --out name + _fid_vs_nfe.png).
For a sampler whose cost is k NFE per step (Heun, DPM-Solver++ 2S: 2 per step but the last), the step
count is chosen so that the NFE is at most the budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("euler", "ddim", "dpm++2m", "dpm++2m-sde", "dpm++2s", "heun", "heun+churn")
# benchmark rows that are a registered sampler with options: EDM's stochastic Heun (Alg. 2), churn in
# sigma in [0.05, 50] (gamma = min(S_churn / N, sqrt(2) - 1): at 18 steps S_churn = 10 is the cap)
VARIANTS = {"heun+churn": ("heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0})}


def steps_for(sampler: str, nfe: int) -> int:
    from ditkit.samplers import get_sampler

    spec = get_sampler(VARIANTS.get(sampler, (sampler,))[0])
    best = 1
    for s in range(1, nfe + 1):
        if (spec.nfe(s) or s) <= nfe:
            best = s
    return best


def run_one(model, sampler: str, steps: int, args) -> dict:
    from ditkit.evaluate import evaluate_model

    name, options = VARIANTS.get(sampler, (sampler, None))
    ev, _ = evaluate_model(model, num=args.num, labels="all", seed=args.seed, batch_size=args.batch_size, sampler=name,
                           steps=steps, cfg_scale=args.cfg_scale, autoguidance=args.autoguidance,
                           options=options or {}, n_boot=50)
    wall = ev["sample_seconds"]
    row = dict(sampler=sampler, steps=steps, nfe=ev["nfe"], fid=ev["fid"]["value"], fid_ci=ev["fid_ci"],
               floor=ev["fid_floor"], accuracy=ev["class_accuracy"]["value"], seconds=wall,
               ms_per_image=1000 * wall / args.num)
    print(f"{sampler:>10} steps={steps:>4} nfe={row['nfe']:>4} fid={row['fid']:.3f} acc={row['accuracy']:.4f} "
          f"{row['seconds']:.1f}s", flush=True)
    return row


def plot(rows: list[dict], ddpm: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for s in SAMPLERS:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == s)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    if ddpm:
        ax.axhline(ddpm["fid"], color="k", ls="--", lw=1, label=f"ddpm, {ddpm['nfe']} NFE")
        ax.axhline(ddpm["fid"] * 1.1, color="k", ls=":", lw=1, label="ddpm +10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID (ditkit MNIST-classifier features)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--nfe", default="5,10,20,50,100")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="0 skips the DDPM reference")
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--autoguidance", type=float, default=1.0, help="by the run's RUN/guide (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "samplers.json"))
    args = ap.parse_args()
    from ditkit.sampling import load_model

    model = load_model(args.ckpt)
    rows = []
    for nfe in [int(v) for v in args.nfe.split(",")]:
        for s in args.samplers.split(","):
            rows.append(run_one(model, s, steps_for(s, nfe), args))
    ddpm = run_one(model, "ddpm", args.ddpm_steps, args) if args.ddpm_steps else None
    # The adaptive RK45 probability-flow solver (rtol = atol = 1e-3) as the ODE reference; its grid only
    # sets where it stops (the last positive sigma), so use a fine one.
    adaptive = run_one(model, "adaptive", 1000, args) if getattr(model.objective, "path", None) is not None else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(ckpt=str(args.ckpt), num=args.num, cfg_scale=args.cfg_scale,
                                   autoguidance=args.autoguidance, rows=rows, ddpm=ddpm, adaptive=adaptive), indent=2))
    plot(rows, ddpm, out.with_name(f"{out.stem}_fid_vs_nfe.png"))
    print("\n| sampler | steps | NFE | FID | class acc. | ms/image |\n|---|---|---|---|---|---|")
    for r in rows + [r for r in (ddpm, adaptive) if r]:
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {100 * r['accuracy']:.1f}% | "
              f"{r['ms_per_image']:.1f} |")


if __name__ == "__main__":
    main()
