"""Text to image with MM-DiT: prompt adherence, attributes, FID, and the prompt cache (issue 52).

    python benchmarks/text_to_image.py cache
        encoder time per request on a cache miss and a hit, and the hit rate under a load of repeated prompts
    python benchmarks/text_to_image.py quality RUN [--per-prompt 3] [--steps 20] [--cfg-scale 3]
        on the held-out prompts (templates never trained on): digit accuracy by ditkit's classifier, FID and
        its ratio to the real-data floor, and bold/thin ink and left/right slant in seed-matched pairs
        (ditkit.text.adherence, as `ditkit eval --prompts held-out`)
    python benchmarks/text_to_image.py attention RUN --out FILE.png [--prompt TEXT ...]
        which image patches read each word of a few prompts (ditkit.viz.word_attention)

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.text import TextSpec  # noqa: E402
from ditkit.text.captions import held_out_prompts  # noqa: E402
from ditkit.text.encoder import TextEncoder  # noqa: E402


def cache_figures(distinct: int = 100, requests: int = 1000, zipf: float = 1.1, seed: int = 0) -> dict:
    """Encoder time per request (a one-prompt request, as the server gets) with and without a cache hit, and the
    hit rate of `requests` requests drawn from `distinct` prompts with Zipf(`zipf`) popularity."""
    enc = TextEncoder(TextSpec(cache_size=4096))
    prompts = [p["text"] for p in held_out_prompts()][:distinct]
    enc.condition([prompts[0]])  # warm-up (first-call allocations), then a clean cache
    enc._cache.clear()
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
    """ditkit.text.adherence on the run's EMA weights (what `ditkit eval --prompts held-out` prints)."""
    from ditkit.runs import load_model
    from ditkit.settings import SamplingSettings
    from ditkit.text.adherence import prompt_adherence

    model = load_model(run)
    settings = SamplingSettings(sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    return {"run": run, "step": model.step, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
            **prompt_adherence(model, settings, per_prompt=per_prompt, seed=seed)}


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
    w = sub.add_parser("attention")
    w.add_argument("run")
    w.add_argument("--prompt", action="append")
    w.add_argument("--seed", type=int, default=0)
    for p in (c, q, w):
        p.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.what == "attention":
        from ditkit.runs import load_model
        from ditkit.viz.word_attention import plot_word_attention, word_attention

        if a.out is None or a.out.suffix != ".png":
            ap.error("attention: give --out FILE.png")
        model = load_model(a.run)
        prompts = a.prompt or ["a bold seven, slanted right", "a thin 1, slanted left", "a small 3", "a large zero"]
        print(plot_word_attention([word_attention(model, p, seed=a.seed) for p in prompts], prompts, a.out))
        return
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
