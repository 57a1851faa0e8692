"""Prompt adherence of a text model on the held-out prompts (`ditkit eval --prompts held-out`, issue 52).

The prompts come from HELD_OUT_TEMPLATES only (never in training: ditkit.text.captions). Every prompt is
drawn with the same `per_prompt` seeds, so prompts that differ in one word make seed-matched pairs:
- digit accuracy: the share of samples that ditkit's MNIST classifier reads as the digit the prompt names;
- FID against the MNIST test set, and its ratio to the real-data floor at the same n (ditkit.eval.metrics);
- FID against real digits that match the prompts (`prompt_matched_fid`): four prompts in five name an
  extreme of thickness or slant, so the samples *should* differ from MNIST as a whole; the reference is then
  the test digits of each prompt's digit and attribute bin (weighted as the prompts are), and the floor the
  FID of training digits drawn in the same counts per (digit, bin) against it;
- thickness: in pairs that differ only in "thin" / "bold", the share where the bold sample has more ink;
- slant: in pairs that differ only in "slanted left" / "slanted right", the share where the right one's
  measured slant is larger (ditkit.text.captions.measure).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import UsageError
from .captions import SLANT_WORDS, THICKNESS_WORDS, AttributeBins, held_out_prompts, measure

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

    matched = prompt_matched_fid(images, [p for p in prompts for _ in range(per_prompt)], seed=seed)
    plain = np.array([p["thickness"] is None and p["slant"] is None for p in prompts]).repeat(per_prompt)
    ok = pred == digits
    return {"n": int(len(images)), "prompts": len(prompts), "per_prompt": per_prompt, "seconds": seconds,
            "settings": draws[0]["settings"].describe(),
            "digit_accuracy": float(ok.mean()), "digit_accuracy_plain": float(ok[plain].mean()),
            "digit_accuracy_with_attributes": float(ok[~plain].mean()),
            "fid": ev["fid"], "fid_floor": ev["fid_floor"], "fid_ratio": ev["fid_ratio"],
            "fid_ratio_same_mix": ev.get("fid_ratio_same_mix"), **matched,
            "bold_more_ink_than_thin": pairs("thickness", "thin", "bold", "thickness"),
            "right_slant_above_left": pairs("slant", "slanted left", "slanted right", "slant")}


def _group_of(prompt: dict[str, Any]) -> tuple[int, str, int]:
    """(digit, attribute, bin) a prompt asks for; ("", -1) for a plain prompt (any thickness and slant)."""
    if prompt.get("thickness"):
        return prompt["digit"], "thickness", THICKNESS_WORDS.index(prompt["thickness"])
    if prompt.get("slant"):
        return prompt["digit"], "slant", SLANT_WORDS.index(prompt["slant"])
    return prompt["digit"], "", -1


def _members(group: tuple[int, str, int], labels: np.ndarray, bins: dict[str, np.ndarray]) -> np.ndarray:
    digit, attr, b = group
    ok = labels == digit
    return np.flatnonzero(ok if not attr else ok & (bins[attr] == b))


def prompt_matched_fid(images: np.ndarray, prompts: Sequence[dict[str, Any]], *, seed: int = 0,
                       draws: int = 5) -> dict[str, Any]:
    """FID of `images` (one per entry of `prompts`) against the real digits their prompts describe, and its
    ratio to the floor of real digits described alike.

    Each prompt names a digit and at most one of thickness or slant (held_out_prompts). The reference is the
    MNIST test digits of that digit whose attribute falls in the named bin (the training set's per-digit
    terciles, as the captions bin them), the groups weighted by how many images asked for each: the
    feature mean and covariance of that mixture. The floor: `draws` sets of training digits with exactly
    the images' count per group, each one's FID against the same reference, averaged."""
    from ..data.mnist import load_mnist
    from ..eval.classifier import features
    from ..eval.fid import frechet_distance

    groups = [_group_of(p) for p in prompts]
    counts: dict[tuple[int, str, int], int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    split_bins = {}
    for split in ("train", "test"):
        x, y = load_mnist(split)
        split_bins[split] = (x, y, measure(x))
    fit = AttributeBins.fit(split_bins["train"][2], split_bins["train"][1])
    # the test reference: the mixture of the groups, each group's digits weighted to its share of images
    xt, yt, vt = split_bins["test"]
    bt = fit.bins(vt, yt)
    index, weight = [], []
    for g, k in counts.items():
        m = _members(g, yt, bt)
        if len(m) == 0:
            raise UsageError(f"prompt-matched FID: no test digit is a {g}")
        index.append(m)
        weight.append(np.full(len(m), k / len(m)))
    index, weight = np.concatenate(index), np.concatenate(weight)
    uniq, back = np.unique(index, return_inverse=True)  # a plain prompt's group holds its attribute groups' digits
    ft = features(xt[uniq]).astype(np.float64)[back]
    w = weight / weight.sum()
    mu = w @ ft
    d = ft - mu
    sigma = (d * w[:, None]).T @ d / (1 - (w ** 2).sum())  # unbiased for weights (reliability weights)
    fid = frechet_distance(*_stats(features(images)), mu, sigma)
    # the floor: training digits in the same counts per group
    xr, yr, vr = split_bins["train"]
    br = fit.bins(vr, yr)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(_members(g, yr, br), size=k, replace=False) for g, k in counts.items()])
        values.append(frechet_distance(*_stats(features(xr[pick])), mu, sigma))
    floor = float(np.mean(values))
    return {"fid_prompt_matched": float(fid), "fid_floor_prompt_matched": floor,
            "fid_ratio_prompt_matched": float(fid) / floor if floor > 0 else float("inf")}


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ..eval.fid import feature_stats

    return feature_stats(np.asarray(feats, dtype=np.float64))


def format_adherence(res: dict[str, Any]) -> str:
    """The result as a few lines for the terminal."""
    return "\n".join([
        f"held-out prompts: {res['prompts']} x {res['per_prompt']} seeds = {res['n']} images ({res['seconds']:.0f} s)",
        f"digit accuracy   {100 * res['digit_accuracy']:.1f}% (plain prompts {100 * res['digit_accuracy_plain']:.1f}%, "
        f"with attributes {100 * res['digit_accuracy_with_attributes']:.1f}%)",
        f"FID              {res['fid']:.2f} = {res['fid_ratio']:.2f}x the real-data floor ({res['fid_floor']:.2f})",
        f"FID, matched     {res['fid_prompt_matched']:.2f} = {res['fid_ratio_prompt_matched']:.2f}x the floor of real digits "
        f"the prompts describe ({res['fid_floor_prompt_matched']:.2f})",
        f"bold > thin ink  {100 * res['bold_more_ink_than_thin']['share']:.1f}% of "
        f"{res['bold_more_ink_than_thin']['pairs']} seed-matched pairs",
        f"right > left     {100 * res['right_slant_above_left']['share']:.1f}% of "
        f"{res['right_slant_above_left']['pairs']} seed-matched pairs (slant)"])
