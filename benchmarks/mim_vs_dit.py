"""The tutorial's table 5.3: a masked image model (ditkit's "mim" family, MaskGIT decoding in 12 steps)
against a DiT with its default sampler, on the same CPU.

    flock /tmp/ditkit-cpu.lock .venv/bin/python benchmarks/mim_vs_dit.py --mim runs/mim [--dit runs/dit]

For each model: parameters (the MIM's tokenizer counted apart), training time per epoch (from the run's
metrics.jsonl: elapsed seconds over epochs done), the time to draw 16 images at batch 16 and at batch 1
(the best of --repeats runs, after one warm-up), NFE, and on --num images (balanced labels, guided):
FID as a ratio to the real-data floor at the same n, and class accuracy (ditkit.eval). With --dit, the DiT
is drawn with its default sampler, what `ditkit sample --ckpt RUN` uses with no sampling flag (the run's own
setting where `ditkit tune` chose one, rejection included), and with the untuned default at --dit-cfg. Without --dit, the
DiT column times the default recipe's network (DiT-T/4) freshly initialised: its sampling time does not
depend on its weights, but it has no FID or accuracy (shown as "-").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ditkit.runs import LoadedModel, load_model, read_tuned_setting
from ditkit.sampling import generate
from ditkit.settings import SamplingSettings


def train_seconds_per_epoch(run_dir: Optional[Path]) -> Optional[float]:
    """elapsed_s / epoch of the run's last logged step (None without a run or a log)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return None
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(lines) if r.get("epoch")), None)
    return last["elapsed_s"] / last["epoch"] if last else None


def fresh_dit() -> LoadedModel:
    """The default recipe's network and objective, untrained: for timing only."""
    from ditkit.models.registry import build_model, model_config
    from ditkit.objectives import build_objective
    from ditkit.train.config import TrainConfig

    tc = TrainConfig()
    torch.manual_seed(0)
    net = build_model(model_config(tc.model)).eval().requires_grad_(False)
    objective = build_objective(tc.objective_config())
    return LoadedModel(net, objective, {"family": "dit", "data": {"num_classes": 10}})


def sample_seconds(model: LoadedModel, settings: SamplingSettings, batch: int, repeats: int) -> tuple[float, int]:
    """The best wall time of drawing 16 images at `batch`, after a warm-up; and the NFE of one image."""
    generate(model, settings, num=batch, batch_size=batch, seed=99)  # warm-up (GEMM row probes, allocator)
    best, nfe = float("inf"), 0
    for r in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, settings, num=16, batch_size=batch, seed=r)
        best, nfe = min(best, time.perf_counter() - t0), out["nfe"]
    return best, nfe


def measure(name: str, model: LoadedModel, settings: SamplingSettings, run_dir: Optional[Path], num: int,
            repeats: int, trained: bool) -> dict[str, Any]:
    from ditkit.eval import evaluate_images

    row: dict[str, Any] = {"model": name, "settings": settings.describe(),
                           "params": sum(p.numel() for p in model.net.parameters())}
    tok = getattr(model.objective, "tokenizer", None)
    if tok is not None:
        row["tokenizer_params"] = sum(p.numel() for p in tok.parameters())
    row["train_s_per_epoch"] = train_seconds_per_epoch(run_dir)
    row["sample16_b16_s"], row["nfe"] = sample_seconds(model, settings, 16, repeats)
    row["sample16_b1_s"], _ = sample_seconds(model, settings, 1, repeats)
    if trained and num:
        out = generate(model, settings, num=num, labels="all", batch_size=250, seed=0)
        ev = evaluate_images(out["images"], out["labels"])
        row.update(n=num, fid=ev["fid"], fid_floor=ev["fid_floor"], fid_ratio=ev["fid_ratio"],
                   accuracy=ev["class_accuracy"]["value"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mim", required=True, help="a trained mim run folder")
    ap.add_argument("--dit", help="a trained DiT run folder (else: sampling time of an untrained DiT-T/4 only)")
    ap.add_argument("--mim-steps", default="12,6", help="maskgit step counts, one MIM row each (the first is compared)")
    ap.add_argument("--mim-cfg", default="1.5", help="guidance scales of the MIM (on logits), one row each")
    ap.add_argument("--dit-cfg", type=float, default=1.5, help="guidance scale of the DiT")
    ap.add_argument("--num", type=int, default=2000, help="images for FID and accuracy (0 = skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mim = load_model(args.mim, device="cpu")
    rows = [measure("MIM", mim, SamplingSettings(sampler="maskgit", steps=int(s), cfg_scale=float(w)),
                    Path(args.mim), args.num, args.repeats, True)
            for w in args.mim_cfg.split(",") for s in args.mim_steps.split(",")]
    dit = load_model(args.dit, device="cpu") if args.dit else fresh_dit()
    dit_dir = Path(args.dit) if args.dit else None
    # the DiT's default sampler: what `ditkit sample --ckpt RUN` draws with no sampling flag (the run's own
    # setting, RUN/sampling.json, where `ditkit tune` chose one); and the untuned default with CFG beside it
    own = read_tuned_setting(dit_dir) if dit_dir is not None else None
    if own is not None:
        rows.append(measure("DiT (its own setting)", dit, own, dit_dir, args.num, args.repeats, True))
    rows.append(measure("DiT", dit, SamplingSettings(cfg_scale=args.dit_cfg), dit_dir, args.num, args.repeats,
                        bool(args.dit)))

    def f(v: Any, fmt: str, unit: str = "") -> str:
        return "-" if v is None else format(v, fmt) + unit

    print("| model | sampler | params | train s/epoch | 16 img @ b16 (s) | 16 img @ b1 (s) | NFE | FID / floor | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" + (f" + {r['tokenizer_params'] / 1e6:.2f}M tokenizer"
                                                 if "tokenizer_params" in r else "")
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        print(f"| {r['model']} | {r['settings']} | {params} | {f(r['train_s_per_epoch'], '.0f')} | "
              f"{r['sample16_b16_s']:.3f} | {r['sample16_b1_s']:.3f} | {r['nfe']} | {f(r.get('fid_ratio'), '.2f', 'x')} | "
              f"{f(acc, '.1f', '%')} |")
    m = rows[0]
    for d in rows:
        if d["model"].startswith("DiT"):
            print(f"MIM ({m['settings']}) sampling speed-up over {d['model']} ({d['settings']}): "
                  f"{d['sample16_b16_s'] / m['sample16_b16_s']:.1f}x at batch 16, "
                  f"{d['sample16_b1_s'] / m['sample16_b1_s']:.1f}x at batch 1")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
