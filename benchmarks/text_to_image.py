"""Text to image with MM-DiT: prompt adherence, attributes, FID, and the prompt cache (issue 52).

    python benchmarks/text_to_image.py cache
        encoder time per request on a cache miss and a hit, and the hit rate under a load of repeated prompts
    python benchmarks/text_to_image.py quality RUN [--per-prompt 3] [--steps 20] [--cfg-scale 3]
        on the held-out prompts (templates never trained on: ditkit.text.captions.HELD_OUT_TEMPLATES):
        - digit accuracy: the share of samples that ditkit's classifier reads as the digit the prompt names;
        - FID against the MNIST test set, and its ratio to the real-data floor at the same n;
        - attributes: per (digit, template, digit form, seed), the "bold" sample's ink mass against the
          "thin" one's, and the "slanted right" sample's slant against the "slanted left" one's (seed-matched
          pairs: the same noise, only the word differs).

Prints one JSON object; --out FILE also writes it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.text import TextSpec  # noqa: E402
from ditkit.text.captions import held_out_prompts, measure  # noqa: E402
from ditkit.text.encoder import TextEncoder  # noqa: E402


def cache_figures(distinct: int = 100, requests: int = 1000, zipf: float = 1.1, seed: int = 0) -> dict:
    """Encoder time per request (a one-prompt request, as the server gets) with and without a cache hit, and the
    hit rate of `requests` requests drawn from `distinct` prompts with Zipf(`zipf`) popularity."""
    enc = TextEncoder(TextSpec(cache_size=4096))
    prompts = [p["text"] for p in held_out_prompts()][:distinct]
    enc.condition([prompts[0]])  # warm-up (first-call allocations), then a clean cache
    enc._cache.clear()
    enc.hits = enc.misses = 0
    miss_ms, hit_ms = [], []
    for p in prompts:
        t0 = time.perf_counter()
        enc.condition([p])
        miss_ms.append(1e3 * (time.perf_counter() - t0))
    for p in prompts:
        t0 = time.perf_counter()
        enc.condition([p])
        hit_ms.append(1e3 * (time.perf_counter() - t0))
    enc._cache.clear()
    enc.hits = enc.misses = 0
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(distinct)]
    t0 = time.perf_counter()
    for p in rng.choices(prompts, weights, k=requests):
        enc.condition([p])
    load_s = time.perf_counter() - t0
    s = enc.stats()
    return {"miss_ms_median": statistics.median(miss_ms), "hit_ms_median": statistics.median(hit_ms),
            "speedup": statistics.median(miss_ms) / statistics.median(hit_ms),
            "load": {"requests": requests, "distinct_prompts": distinct, "zipf": zipf,
                     "hit_rate": s["hits"] / (s["hits"] + s["misses"]), "ms_per_request": 1e3 * load_s / requests}}


def quality_figures(run: str, per_prompt: int, steps: int, cfg_scale: float, sampler: str, seed: int) -> dict:
    from ditkit.eval.classifier import classify
    from ditkit.eval.metrics import evaluate_images
    from ditkit.runs import load_model
    from ditkit.sampling import generate

    model = load_model(run)
    prompts = held_out_prompts(attributes=True) + held_out_prompts(attributes=False)
    texts = [p["text"] for p in prompts for _ in range(per_prompt)]
    # every prompt gets the same seeds: seed-matched pairs differ in their words alone
    t0 = time.perf_counter()
    images = []
    for k in range(per_prompt):
        out = generate(model, num=len(prompts), prompts=[p["text"] for p in prompts], seed=seed + 100_003 * k,
                       sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=100)
        images.append(out["images"])
    seconds = time.perf_counter() - t0
    imgs = np.stack(images, 1).reshape(-1, *images[0].shape[1:])  # (P * k, H, W, C), prompt-major
    digits = np.repeat([p["digit"] for p in prompts], per_prompt)
    pred = classify(imgs)
    ev = evaluate_images(imgs, digits)
    m = measure(imgs[..., 0])
    P = len(prompts)

    def pairs(attr: str, low: str, high: str, value: str) -> dict:
        key = {}
        for i, p in enumerate(prompts):
            if p[attr] in (low, high):
                t = p["text"].replace(p[attr], "{}")
                key.setdefault(t, {})[p[attr]] = i
        wins = n = 0
        for v in key.values():
            if low in v and high in v:
                for k in range(per_prompt):
                    a = m[value][v[low] * per_prompt + k]
                    b = m[value][v[high] * per_prompt + k]
                    wins += int(b > a)
                    n += 1
        return {"pairs": n, "share_high_above_low": wins / max(n, 1)}

    by_kind = {"plain": [i for i, p in enumerate(prompts) if p["thickness"] is None and p["slant"] is None],
               "with_attributes": [i for i, p in enumerate(prompts) if p["thickness"] or p["slant"]]}
    acc = {kind: float(np.mean([pred[i * per_prompt + k] == prompts[i]["digit"] for i in idx
                                for k in range(per_prompt)])) for kind, idx in by_kind.items()}
    return {"run": run, "step": model.step, "samples": int(len(imgs)), "prompts": P, "per_prompt": per_prompt,
            "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "sampling_seconds": seconds,
            "digit_accuracy": float(np.mean(pred == digits)), "digit_accuracy_by_kind": acc,
            "fid": ev["fid"], "fid_floor": ev["fid_floor"], "fid_ratio": ev["fid_ratio"],
            "fid_ratio_same_mix": ev.get("fid_ratio_same_mix"),
            "thickness_bold_vs_thin": pairs("thickness", "thin", "bold", "thickness"),
            "slant_right_vs_left": pairs("slant", "slanted left", "slanted right", "slant")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--distinct", type=int, default=100)
    c.add_argument("--requests", type=int, default=1000)
    q = sub.add_parser("quality")
    q.add_argument("run")
    q.add_argument("--per-prompt", type=int, default=3)
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--cfg-scale", type=float, default=3.0)
    q.add_argument("--sampler", default="dpm++2m")
    q.add_argument("--seed", type=int, default=0)
    for p in (c, q):
        p.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.what == "cache":
        res = cache_figures(a.distinct, a.requests)
    else:
        res = quality_figures(a.run, a.per_prompt, a.steps, a.cfg_scale, a.sampler, a.seed)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
