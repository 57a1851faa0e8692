"""Which images should rejection redraw? Offline, from one pool of drawn images and the model's own
class evidence (`ditkit.samplers.implicit`), the FID and class accuracy of several acceptance rules.

    python benchmarks/probes/reject_policies.py --ckpt runs/a --pool 5000 --num 3000 \\
        --rules m0,m0.04,m0.08,m0.12,q0.95,m0.08+q0.95 --out docs/bench/reject_policies.jsonl

The pool is `--pool` images drawn as `ditkit eval` draws them (labels in the training mix, fixed seeds;
`--sampler/--steps/--autoguidance/--cfg-scale`). Every image gets E_c, its denoising error under each
class c (`implicit.class_errors`, the same noise as `--reject` uses), and so do `--real` random training
digits. A rule accepts an image when all its parts hold:
  mM  the relative margin (`implicit.relative_margin`) is below -M: what `ditkit eval --reject M` keeps;
  qQ  E_asked is at most the Q-quantile of E_asked over the real digits of the same class (a plausibility
      bound calibrated on real data).
Per class, the first accepted images of the pool fill that class's count among the first `--num` labels,
as redrawing until accepted would (up to `--reject`'s draw limit). The real digits' own acceptance is
printed too: a rule that refuses many real digits narrows the samples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def errors(model, images: np.ndarray, seeds, batch: int = 250) -> torch.Tensor:
    """E_c for uint8 images (N, H, W, C) with the noise `ditkit eval --reject` gives them (`sampling.implicit_errors`)."""
    from ditkit.sampling import implicit_errors

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(model.device) / 127.5 - 1
    return torch.cat([implicit_errors(model, x[i:i + batch], seeds[i:i + batch]).cpu() for i in range(0, len(x), batch)])


def parse_rule(rule: str) -> list[tuple[str, float]]:
    """'m0.08+q0.95' -> [('m', 0.08), ('q', 0.95)]; 'none' -> [] (accept everything)."""
    if rule == "none":
        return []
    parts = []
    for part in rule.split("+"):
        kind = part[:1]
        try:
            value = float(part[1:])
        except ValueError:
            value = float("nan")
        if kind not in ("m", "q") or not value >= 0:  # also refuses NaN
            raise SystemExit(f"--rules: {part!r} is not a rule part (allowed: mM or qQ with a number >= 0, joined by +)")
        parts.append((kind, value))
    return parts


def accepted(parts: list[tuple[str, float]], margin: np.ndarray, e_asked: np.ndarray, labels: np.ndarray,
             real_e: np.ndarray, real_labels: np.ndarray, num_classes: int) -> np.ndarray:
    ok = np.ones(len(margin), bool)
    for kind, value in parts:
        if kind == "m":
            ok &= margin < -value
        else:
            bound = np.array([np.quantile(real_e[real_labels == c], value) for c in range(num_classes)])
            ok &= e_asked <= bound[labels]
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--num", type=int, default=3000)
    ap.add_argument("--real", type=int, default=3000, help="random training digits that calibrate qQ")
    ap.add_argument("--rules", default="m0,m0.04,m0.08,m0.12,q0.95,m0.08+q0.95")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--autoguidance", type=float, default=2.0)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    rules = ["none"] + [r for r in args.rules.split(",") if r.strip()]
    parsed = [parse_rule(r) for r in rules]  # a bad rule is refused before the long reading
    from ditkit.data import load_mnist
    from ditkit.eval.metrics import evaluate_images
    from ditkit.sampling import generate, load_model
    from ditkit.samplers.implicit import relative_margin

    model = load_model(args.ckpt, compile=True)
    t0 = time.perf_counter()
    g = generate(model, num=args.pool, labels="prior", seed=args.seed, batch_size=250, sampler=args.sampler,
                 steps=args.steps, cfg_scale=args.cfg_scale, autoguidance=args.autoguidance)
    e_gen = errors(model, g["images"], g["seeds"])
    x_real, y_real = load_mnist("train")
    pick = np.random.default_rng(1).choice(len(x_real), args.real, replace=False)
    x_real, y_real = x_real[pick][..., None], y_real[pick].astype(np.int64)
    e_real = errors(model, x_real, list(range(10 ** 6, 10 ** 6 + args.real)))
    print(f"pool of {args.pool} and {args.real} real digits read in {time.perf_counter() - t0:.0f} s", flush=True)

    labels = np.asarray(g["labels"])
    margin = relative_margin(e_gen, torch.as_tensor(labels)).numpy()
    real_margin = relative_margin(e_real, torch.as_tensor(y_real)).numpy()
    e_asked = e_gen.numpy()[np.arange(len(labels)), labels]
    real_e = e_real.numpy()[np.arange(len(y_real)), y_real]
    quota = np.bincount(labels[:args.num], minlength=model.num_classes)
    rows = []
    for rule, parts in zip(rules, parsed):
        ok = accepted(parts, margin, e_asked, labels, real_e, y_real, model.num_classes)
        real_ok = accepted(parts, real_margin, real_e, y_real, real_e, y_real, model.num_classes)
        chosen = [np.nonzero((labels == c) & ok)[0][:quota[c]] for c in range(model.num_classes)]
        if any(len(ch) < q for ch, q in zip(chosen, quota)):
            print(f"{rule:>14}: the pool holds too few accepted images of some class; raise --pool")
            continue
        idx = np.sort(np.concatenate(chosen))
        ev = evaluate_images(g["images"][idx], labels[idx])
        row = dict(ckpt=args.ckpt, step=model.step, rule=rule, pool=args.pool, num=args.num, seed=args.seed,
                   sampler=args.sampler, steps=args.steps, autoguidance=args.autoguidance, cfg_scale=args.cfg_scale,
                   accepted=float(ok.mean()), real_accepted=float(real_ok.mean()),
                   accuracy=ev["class_accuracy"]["value"], fid=ev["fid"], floor=ev["fid_floor"],
                   ratio=ev["fid_ratio"], ratio_same_mix=ev.get("fid_ratio_same_mix"))
        rows.append(row)
        print(f"{rule:>14}: accepts {row['accepted']:.3f} of the pool ({row['real_accepted']:.3f} of real digits)  "
              f"acc {row['accuracy']:.4f}  FID {row['fid']:.3f}  ratio {row['ratio']:.3f}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
