"""Inference-time scaling on a trained class model: quality against compute for more steps, stronger
guidance, rejection and best-of-N (each verifier), at the same seeds and labels.

    python benchmarks/best_of.py --ckpt runs/levers_t4 [--num 500] [--out docs/bench/best_of]

Compute is network evaluations per image (one image's row through the DiT): steps x (2 with CFG, whose
conditional and unconditional rows run together) per draw, times the draws, plus each verdict's
(`bestof.verifier_nfe`: 80 for the implicit verifier of a 10-class model, 0 for the classifier). Quality:
FID ratio (FID over the real-data floor at this n) and class accuracy, both by ditkit's classifier: the
classifier verifier picks images by the same network, so its accuracy is optimistic. Writes
OUT.jsonl (one row per setting) and OUT.png (FID ratio and accuracy against compute).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name, settings changes): the default sampler (dpm++2m-sde) unless changed
SETTINGS = [
    ("10 steps", dict(steps=10)),
    ("20 steps", dict(steps=20)),
    ("40 steps", dict(steps=40)),
    ("CFG 1.5", dict(cfg_scale=1.5)),
    ("CFG 2.5", dict(cfg_scale=2.5)),
    ("reject 0", dict(reject=0.0)),
    ("best-of-2 implicit", dict(best_of=2, verifier="implicit")),
    ("best-of-2 classifier", dict(best_of=2, verifier="classifier")),
    ("best-of-4 classifier", dict(best_of=4, verifier="classifier")),
    ("10 steps best-of-4 classifier", dict(steps=10, best_of=4, verifier="classifier")),
    ("CFG 1.5 best-of-2 classifier", dict(cfg_scale=1.5, best_of=2, verifier="classifier")),
]


def evaluations_per_image(model, st, out: dict, num: int) -> float:
    """Network evaluations per image of one setting (see the module docstring)."""
    from ditkit.bestof import verifier_nfe

    draw = out["nfe"] * (2 if st.cfg_scale != 1 else 1)  # out["nfe"]: sampler calls of one draw
    if st.best_of > 1:
        return st.best_of * (draw + verifier_nfe(model, st.verifier))
    if st.reject is not None:
        draws = 1 + out["redraws"] / num
        return draws * (draw + verifier_nfe(model, "implicit"))
    return draw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--only", default=None, help="comma list of setting indexes to run (default all)")
    ap.add_argument("--out", default="docs/bench/best_of")
    args = ap.parse_args()
    from ditkit.eval.metrics import evaluate_images
    from ditkit.runs import load_model
    from ditkit.sampling import generate
    from ditkit.settings import SamplingSettings

    model = load_model(args.ckpt)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    chosen = SETTINGS if args.only is None else [SETTINGS[int(i)] for i in args.only.split(",")]
    with open(out_path.with_suffix(".jsonl"), "a") as f:
        for name, changes in chosen:
            st = SamplingSettings(**changes).validate(model)
            out = generate(model, st, num=args.num, labels="all", seed=0, batch_size=100)
            ev = evaluate_images(out["images"], out["labels"])
            row = {"setting": name, "evaluations_per_image": evaluations_per_image(model, st, out, args.num),
                   "fid_ratio": ev["fid_ratio"], "accuracy": ev["class_accuracy"]["value"],
                   "accuracy_ci": [ev["class_accuracy"]["ci_low"], ev["class_accuracy"]["ci_high"]],
                   "seconds": out["seconds"], "num": args.num, "settings": st.to_dict()}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    plot(out_path)


def plot(out_path: Path) -> None:
    """FID ratio and accuracy against evaluations per image, one marker per family of setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in out_path.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        kind = ("best-of" if "best-of" in r["setting"] else "reject" if "reject" in r["setting"]
                else "CFG" if "CFG" in r["setting"] else "steps")
        style = {"steps": "o", "CFG": "s", "reject": "^", "best-of": "*"}[kind]
        for ax, key in zip(axes, ("fid_ratio", "accuracy")):
            ax.scatter(r["evaluations_per_image"], r[key], marker=style, s=60)
            ax.annotate(r["setting"], (r["evaluations_per_image"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    axes[0].set_ylabel("FID / real-data floor (lower is better)")
    axes[1].set_ylabel("class accuracy (ditkit classifier)")
    for ax in axes:
        ax.set_xlabel("network evaluations per image")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
