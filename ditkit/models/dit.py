"""DiT: Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

patchify -> + position embedding -> N blocks with adaLN-Zero on c = emb(t) + emb(class) -> adaLN final
layer -> unpatchify. The network knows nothing of noise schedules: `net(x, t, cond)` maps an image and
a scalar time per sample to an image-shaped output whose meaning (noise, velocity, data) is the
objective's business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from ..condition import Condition
from ..errors import UsageError
from .layers import AdaLNZeroBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify


@dataclass
class DiTConfig:
    input_size: int = 28  # square images, H = W
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10  # 0 = unconditional; the null (guidance) class id is num_classes
    pos_embed: str = "sincos"  # "sincos" (fixed, as in the paper) or "learned"
    gelu_approximate: str = "none"  # "none" (exact, fast on CPU) or "tanh" (the DiT reference's)

    def validate(self) -> "DiTConfig":
        if self.input_size < 1 or self.input_size % self.patch_size:
            raise UsageError(f"image size {self.input_size} must be a positive multiple of the patch size {self.patch_size}")
        if self.in_channels not in (1, 3):
            raise UsageError(f"in_channels={self.in_channels}: allowed values are 1 and 3")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise UsageError(f"sin-cos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.pos_embed not in ("sincos", "learned"):
            raise UsageError(f"pos_embed={self.pos_embed!r}: allowed values are 'sincos' and 'learned'")
        if self.gelu_approximate not in ("none", "tanh"):
            raise UsageError(f"gelu_approximate={self.gelu_approximate!r}: allowed 'none' and 'tanh'")
        if self.num_classes < 0:
            raise UsageError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown DiT config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d).validate()


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.grid = c.input_size // c.patch_size
        self.num_tokens = self.grid * self.grid
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size) if c.num_classes > 0 else None
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, self.grid, self.grid)).float().unsqueeze(0)
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos.clone())  # initialised at the sin-cos values
        else:
            self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList(AdaLNZeroBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.gelu_approximate) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # As in the DiT reference: xavier-uniform linears, patch conv like a linear, N(0, 0.02) embeddings;
        # adaLN modulations and the output layer stay zero (adaLN-Zero), set in their constructors.
        zero = {id(m) for b in self.blocks for m in b.adaLN_modulation} | {
            id(self.final_layer.linear), id(self.final_layer.adaLN_modulation[-1])}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in zero:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def embed_condition(self, t: torch.Tensor, cond: Condition | None) -> torch.Tensor:
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if cond is None or cond.labels is None:
                raise ValueError("this DiT is class-conditional: pass Condition.from_labels(...) "
                                 f"(use label {self.config.num_classes} for the null class)")
            c = c + self.y_embedder(cond.labels)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) float time as the objective defines it, cond -> (B, C, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.embed_condition(t, cond)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final_layer(tokens, c)  # (B, N, P*P*C)
        cfg = self.config
        return unpatchify(out, cfg.patch_size, cfg.in_channels, cfg.input_size, cfg.input_size)
