"""Prompt adherence of a text model on the held-out prompts (`ditkit eval --prompts held-out`, issue 52).

The prompts come from HELD_OUT_TEMPLATES only (never in training: ditkit.text.captions). Every prompt is
drawn with the same `per_prompt` seeds, so prompts that differ in one word make seed-matched pairs:
- digit accuracy: the share of samples that ditkit's MNIST classifier reads as the digit the prompt names;
- FID against the MNIST test set, and its ratio to the real-data floor at the same n (ditkit.eval.metrics);
- thickness: in pairs that differ only in "thin" / "bold", the share where the bold sample has more ink;
- slant: in pairs that differ only in "slanted left" / "slanted right", the share where the right one's
  measured slant is larger (ditkit.text.captions.measure).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import UsageError
from .captions import held_out_prompts, measure

PROMPT_SETS = ("held-out",)
SEED_STRIDE = 100_003  # seed of draw k: seed + k * SEED_STRIDE (each draw's images get image_seeds of it)


def prompt_adherence(model, settings=None, *, per_prompt: int = 3, seed: int = 0, batch_size: int = 100,
                     digits: Sequence[int] = range(10),
                     progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """The figures above for a loaded text model (ditkit.runs.load_model) and its sampling `settings`, on
    the held-out prompts of `digits`."""
    from ..eval.classifier import classify
    from ..eval.metrics import evaluate_images
    from ..sampling import generate

    if getattr(model, "text_encoder", None) is None:
        raise UsageError("--prompts held-out: this model takes class labels, not text (use --labels)")
    if per_prompt < 1:
        raise UsageError(f"--per-prompt {per_prompt}: must be >= 1")
    prompts = held_out_prompts(digits, attributes=True) + held_out_prompts(digits, attributes=False)
    texts = [p["text"] for p in prompts]
    t0 = time.perf_counter()
    draws = [generate(model, settings, num=len(texts), prompts=texts, seed=seed + SEED_STRIDE * k,
                      batch_size=batch_size, progress=progress) for k in range(per_prompt)]
    seconds = time.perf_counter() - t0
    images = np.stack([d["images"] for d in draws], 1).reshape(-1, *draws[0]["images"].shape[1:])  # prompt-major
    digits = np.repeat([p["digit"] for p in prompts], per_prompt)
    pred = classify(images)
    ev = evaluate_images(images, digits)
    m = measure(images[..., 0] if images.shape[-1] == 1 else images.mean(-1))

    def pairs(attr: str, low: str, high: str, value: str) -> dict[str, Any]:
        groups: dict[str, dict[str, int]] = {}
        for i, p in enumerate(prompts):
            if p[attr] in (low, high):
                groups.setdefault(p["text"].replace(p[attr], "{}"), {})[p[attr]] = i
        wins = [m[value][g[high] * per_prompt + k] > m[value][g[low] * per_prompt + k]
                for g in groups.values() if low in g and high in g for k in range(per_prompt)]
        return {"pairs": len(wins), "share": float(np.mean(wins)) if wins else float("nan")}

    plain = np.array([p["thickness"] is None and p["slant"] is None for p in prompts]).repeat(per_prompt)
    ok = pred == digits
    return {"n": int(len(images)), "prompts": len(prompts), "per_prompt": per_prompt, "seconds": seconds,
            "settings": draws[0]["settings"].describe(),
            "digit_accuracy": float(ok.mean()), "digit_accuracy_plain": float(ok[plain].mean()),
            "digit_accuracy_with_attributes": float(ok[~plain].mean()),
            "fid": ev["fid"], "fid_floor": ev["fid_floor"], "fid_ratio": ev["fid_ratio"],
            "fid_ratio_same_mix": ev.get("fid_ratio_same_mix"),
            "bold_more_ink_than_thin": pairs("thickness", "thin", "bold", "thickness"),
            "right_slant_above_left": pairs("slant", "slanted left", "slanted right", "slant")}


def format_adherence(res: dict[str, Any]) -> str:
    """The result as a few lines for the terminal."""
    return "\n".join([
        f"held-out prompts: {res['prompts']} x {res['per_prompt']} seeds = {res['n']} images ({res['seconds']:.0f} s)",
        f"digit accuracy   {100 * res['digit_accuracy']:.1f}% (plain prompts {100 * res['digit_accuracy_plain']:.1f}%, "
        f"with attributes {100 * res['digit_accuracy_with_attributes']:.1f}%)",
        f"FID              {res['fid']:.2f} = {res['fid_ratio']:.2f}x the real-data floor ({res['fid_floor']:.2f})",
        f"bold > thin ink  {100 * res['bold_more_ink_than_thin']['share']:.1f}% of "
        f"{res['bold_more_ink_than_thin']['pairs']} seed-matched pairs",
        f"right > left     {100 * res['right_slant_above_left']['share']:.1f}% of "
        f"{res['right_slant_above_left']['pairs']} seed-matched pairs (slant)"])
