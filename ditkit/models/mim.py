"""The "mim" family: a bidirectional transformer over a grid of discrete image tokens, the network of a
masked image model (MaskGIT, Chang et al. 2022; Muse / aMUSEd, Chang et al. 2023, Patil et al. 2024).

    tokens (B, N) in [0, K] (K = the [MASK] id) -> embedding + position -> blocks -> logits (B, N, K)

N = grid_size^2 tokens from the tokenizer (ditkit.models.vq), K = its codebook size. Every position
attends to every other (no causal mask): the model predicts all masked tokens at once from the visible
ones. It is built from ditkit's shared layers: the class condition enters each block through adaLN-Zero
(`layers.AdaLNZeroBlock`, as in DiT, with the class embedding as c and no time embedding: the masked
fraction is visible in the input itself), and the head is DiT's adaLN final layer with K outputs per
token. The null class (id num_classes) is the unconditional model for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..condition import Condition
from ..config_base import ConfigBase
from ..errors import UsageError
from .layers import MLPS, NORMS, AdaLNZeroBlock, FinalLayer, LabelEmbedder, rope_2d, sincos_pos_embed_2d
from .registry import Family


@dataclass
class MIMConfig(ConfigBase):
    KIND = "mim"
    input_size: int = 28  # the decoded images' side (the tokenizer's); the network sees grid_size^2 tokens
    in_channels: int = 1
    num_classes: int = 10  # 0 = unconditional; the null (guidance) class id is num_classes
    grid_size: int = 7  # the tokenizer's grid side
    codebook_size: int = 256  # K, the tokenizer's; the [MASK] id is K
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embed: str = "learned"  # "learned" or "sincos"
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    rope: bool = False

    def validate(self) -> "MIMConfig":
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise UsageError(f"mim model {field}={getattr(self, field)!r}: {allowed}")

        need(self.in_channels in (1, 3), "in_channels", "allowed 1, 3")
        need(self.num_classes >= 0, "num_classes", "must be >= 0 (0 = unconditional)")
        need(self.grid_size >= 1 and self.input_size >= self.grid_size and self.input_size % self.grid_size == 0,
             "grid_size", f"must divide the image size {self.input_size} (the tokenizer's grid)")
        need(2 <= self.codebook_size <= 65536, "codebook_size", "must be in [2, 65536] (the tokenizer's)")
        need(self.depth >= 1, "depth", "must be >= 1")
        need(self.num_heads >= 1 and self.hidden_size % self.num_heads == 0, "num_heads",
             f"must divide hidden_size {self.hidden_size}")
        need(self.pos_embed in ("learned", "sincos"), "pos_embed", "allowed learned, sincos")
        need(self.pos_embed != "sincos" or self.hidden_size % 4 == 0, "hidden_size",
             "must be divisible by 4 for the sin-cos position embedding")
        need(self.norm in NORMS, "norm", f"allowed {', '.join(NORMS)}")
        need(self.mlp in MLPS, "mlp", f"allowed {', '.join(MLPS)}")
        need(not self.rope or (self.hidden_size // self.num_heads) % 4 == 0, "rope",
             "needs a head width (hidden_size / num_heads) divisible by 4")
        return self

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def mask_id(self) -> int:
        return self.codebook_size


class MaskedTokenTransformer(nn.Module):
    """net(tokens (B, N) int64, cond) -> logits (B, N, K) over the codebook (never the [MASK] id)."""

    def __init__(self, config: MIMConfig):
        super().__init__()
        self.config = c = config.validate()
        D, N = c.hidden_size, c.num_tokens
        self.token_embed = nn.Embedding(c.codebook_size + 1, D)  # row K: [MASK]
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, N, D) * 0.02)
        else:
            pe = torch.from_numpy(sincos_pos_embed_2d(D, c.grid_size, c.grid_size)).float().unsqueeze(0)
            self.register_buffer("pos_embed", pe, persistent=False)
        if c.rope:
            cos, sin = rope_2d(D // c.num_heads, c.grid_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # an unconditional model has one row, the "null" class 0, that every image uses
        self.label_embed = LabelEmbedder(c.num_classes, D)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(D, c.num_heads, c.mlp_ratio, norm=c.norm, qk_norm=c.qk_norm,
                                                   mlp=c.mlp) for _ in range(c.depth))
        self.final = FinalLayer(D, 1, c.codebook_size, norm=c.norm)  # zero-initialised: uniform logits at start

    def condition(self, cond: Condition, batch: int, device: torch.device) -> torch.Tensor:
        """c (B, D): the class embedding, the null class where a label is the null id or absent."""
        if cond.tokens is not None:
            raise UsageError("mim model: text conditioning needs a text-conditioned MIM run; this one is "
                             f"{'class-conditional' if self.config.num_classes else 'unconditional'}")
        if cond.labels is None:
            labels = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        else:
            labels = cond.labels.to(device)
        return self.label_embed(labels)

    def forward(self, tokens: torch.Tensor, cond: Condition) -> torch.Tensor:
        B, N = tokens.shape
        if N != self.config.num_tokens:
            raise UsageError(f"mim model: {N} tokens for a {self.config.grid_size}x{self.config.grid_size} grid")
        dtype = self.token_embed.weight.dtype
        x = self.token_embed(tokens) + self.pos_embed.to(dtype)  # (B, N, D)
        c = self.condition(cond, B, tokens.device).to(dtype)  # (B, D)
        rope = (self.rope_cos, self.rope_sin) if self.config.rope else None
        for block in self.blocks:
            x = block(x, c, rope=rope)
        return self.final(x, c)  # (B, N, K)


# the DiT-T/4 shape (4 blocks, width 128, 4 heads) over a 7x7 grid; S: the DiT-S width and depth halved
PRESETS: dict[str, dict[str, Any]] = {
    "MIM-T": dict(depth=4, hidden_size=128, num_heads=4),
    "MIM-S": dict(depth=6, hidden_size=256, num_heads=4),
}

FAMILY = Family(name="mim", config_cls=MIMConfig, net_cls=MaskedTokenTransformer, presets=PRESETS,
                description="a masked image model over a tokenizer's codes (MaskGIT / aMUSEd)")
