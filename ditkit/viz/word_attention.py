"""Word-to-patch attention of a text model (MM-DiT): which image patches read each word of the prompt.

For each prompt: draw an image, noise it to `sigma` (low enough that the digit stays visible in x), run
the denoiser once and take `MMDiT.attention_maps` (each patch's attention on the real text tokens,
renormalised over them, averaged over heads; as Prompt-to-Prompt's cross-attention maps, Hertz et al.
2022). A word split into word pieces ("slant", "##ed") gets the sum of its pieces' maps; [CLS], [SEP] and
punctuation are left out. The figure: one row per prompt, the image then one map per word (mean over
blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UsageError
from ..utils import ImageRNG, atomic_write_bytes
from .attention import DEFAULT_ATTN_SIGMA, _png, upsample


def words_of(encoder, prompt: str) -> list[tuple[str, list[int]]]:
    """[(word, token positions)] of `prompt` as the encoder reads it (truncation included), word pieces
    merged; special tokens and punctuation left out."""
    ids = encoder.tokenizer(prompt, truncation=True, max_length=encoder.max_tokens)["input_ids"]
    out: list[tuple[str, list[int]]] = []
    for pos, tok in enumerate(encoder.tokenizer.convert_ids_to_tokens(ids)):
        if tok in ("[CLS]", "[SEP]", "[PAD]") or not any(ch.isalnum() for ch in tok):
            continue
        if tok.startswith("##") and out:
            out[-1] = (out[-1][0] + tok[2:], out[-1][1] + [pos])
        else:
            out.append((tok, [pos]))
    return out


@torch.no_grad()
def word_attention(model, prompt: str, *, seed: int = 0, sigma: float = DEFAULT_ATTN_SIGMA, steps: int = 20,
                   cfg_scale: float = 3.0) -> dict:
    """{"image": uint8 (H, W, C), "words": [str], "maps": (words, depth, grid, grid) float32} for `prompt`."""
    from ..sampling import generate

    net, encoder = model.net, getattr(model, "text_encoder", None)
    if encoder is None or not hasattr(net, "attention_maps"):
        raise UsageError("word attention: for text models (MMDiT-*) only")
    image = generate(model, num=1, prompts=[prompt], seed=seed, steps=steps, cfg_scale=cfg_scale)["images"][0]
    c, h, w = model.image_shape
    dev = model.device
    x0 = torch.from_numpy(image).permute(2, 0, 1)[None].to(dev, torch.float32) / 127.5 - 1.0  # (1, C, H, W)
    x = x0 + sigma * ImageRNG([seed], dev).randn((c, h, w))  # sigma-space: x = x0 + sigma * eps
    cond = encoder.condition([prompt], dev)
    store: dict = {}

    def probe(x_t: torch.Tensor, t: torch.Tensor, cond_: object) -> torch.Tensor:
        store["maps"] = net.attention_maps(x_t, t, cond_)  # (1, depth, L, grid, grid)
        return net(x_t, t, cond_)

    model.objective.denoiser(probe)(x, torch.full((1,), float(sigma), dtype=torch.float64, device=dev), cond)
    words = words_of(encoder, prompt)
    maps = store["maps"][0].float().cpu()  # (depth, L, g, g)
    per_word = torch.stack([maps[:, pos].sum(1) for _, pos in words]) if words else maps[:, :0].transpose(0, 1)
    return {"image": image, "words": [wd for wd, _ in words], "maps": per_word.numpy()}


def plot_word_attention(results: Sequence[dict], prompts: Sequence[str], out: str | Path) -> Path:
    """One row per prompt: the image, then each word's map (mean over blocks) over it."""
    from matplotlib.figure import Figure

    cols = 1 + max(len(r["words"]) for r in results)
    fig = Figure(figsize=(1.4 * cols, 1.55 * len(results) + 0.3), dpi=110)
    axes = fig.subplots(len(results), cols, squeeze=False)
    for row, (res, prompt) in enumerate(zip(results, prompts)):
        img = res["image"].astype(np.float32).mean(-1)
        axes[row, 0].imshow(img, cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(prompt if len(prompt) <= 28 else prompt[:27] + "...", fontsize=6, loc="left")
        for k, word in enumerate(res["words"], 1):
            m = upsample(res["maps"][k - 1].mean(0), img.shape)
            axes[row, k].imshow(img, cmap="gray", vmin=0, vmax=255)
            axes[row, k].imshow(m, cmap="inferno", alpha=0.6)
            axes[row, k].set_title(word, fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle("which patches read each word (MM-DiT joint attention, mean over blocks and heads)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, _png(fig))
    return out
