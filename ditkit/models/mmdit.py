"""MM-DiT: the multimodal Diffusion Transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", sec. 4 and fig. 2).

Text tokens (a frozen encoder's states, projected from 384 to the width) and image patches are two
streams, each with its own weights: adaLN modulation, norms, QKV, output projection and MLP. In every
block the two streams meet in ONE attention over the concatenated [text; image] sequence (text padding
masked out of the keys), with QK-norm (RMSNorm per head, sec. 5.3.2). adaLN-Zero modulates both
streams from c = emb(t) + emb(pooled text). The last block is "context pre-only", as SD3's: the text
stream's output after it is never read, so that block gives text keys and values only.

The network keeps DiT's contract: `net(x, t, cond)` -> a tensor shaped like x, with cond.tokens (B, L,
384), cond.mask (B, L) and cond.pooled (B, 384) from `ditkit.text` (`TextEncoder.condition`); it knows
no noise schedule, so every objective, sampler and guidance works on it unchanged. Built from
`ditkit.models.layers` (PatchEmbed, TimestepEmbedder, Mlp, RMSNorm, FinalLayer, patchify's layout), not
from a copy of dit.py.

Shapes: B batch, L text tokens, N image tokens, T = L + N, D width, H heads, Dh = D / H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..condition import Condition
from ..config_base import ConfigBase
from ..errors import UsageError
from .layers import (FinalLayer, Linear, Mlp, PatchEmbed, RMSNorm, TimestepEmbedder, _one_plus_scale, make_norm,
                     sincos_pos_embed_2d, unpatchify)

TEXT_DIM = 384  # all-MiniLM-L6-v2's width (ditkit.text.TEXT_DIM; kept here so that the model imports no encoder)


@dataclass
class MMDiTConfig(ConfigBase):
    KIND = "MM-DiT"
    input_size: int = 28  # square images, H = W
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # always 0: the condition is text (cond.tokens), never a class label
    text_dim: int = TEXT_DIM  # the text encoder's width: token states and pooled vector
    qk_norm: bool = True  # RMSNorm with a gain on each head's queries and keys (SD3, sec. 5.3.2)

    def validate(self) -> "MMDiTConfig":
        if self.patch_size < 1 or self.input_size < 1 or self.input_size % self.patch_size:
            raise UsageError(f"image size {self.input_size} must be a positive multiple of the patch size {self.patch_size}")
        if self.in_channels not in (1, 3):
            raise UsageError(f"in_channels={self.in_channels}: allowed values are 1 and 3")
        if self.depth < 1:
            raise UsageError(f"depth={self.depth}: must be >= 1")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise UsageError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise UsageError(f"sin-cos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.num_classes != 0:
            raise UsageError(f"num_classes={self.num_classes}: MM-DiT is conditioned on text, not classes; allowed 0")
        if self.text_dim < 1:
            raise UsageError(f"text_dim={self.text_dim}: must be >= 1")
        if self.mlp_ratio <= 0:
            raise UsageError(f"mlp_ratio={self.mlp_ratio}: must be > 0")
        return self


# depth, width, heads, patch: DiT's Tiny / S / B shapes (Peebles & Xie, table 1) with two streams
PRESETS: dict[str, dict[str, int]] = {
    "MMDiT-T/4": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4),
    "MMDiT-T/2": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    "MMDiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "MMDiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "MMDiT-B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "MMDiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
}


class Stream(nn.Module):
    """One modality's weights in an MM-DiT block: adaLN modulation, pre-attention norm, QKV with QK-norm,
    and (unless `pre_only`) output projection, post-attention norm and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.pre_only = pre_only
        self.chunks = 2 if pre_only else 6  # (shift, scale) or (shift, scale, gate) for attention and MLP
        self.norm1 = make_norm("layernorm", dim)
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, affine=True) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, affine=True) if qk_norm else None
        if not pre_only:
            self.proj = Linear(dim, dim)
            self.norm2 = make_norm("layernorm", dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, self.chunks * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: a fresh block adds nothing
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        self.register_buffer("_one_plus", _one_plus_scale(self.chunks, (1,) if pre_only else (1, 4), dim),
                             persistent=False)

    def modulation(self, c: torch.Tensor) -> list[torch.Tensor]:
        """c (B, D) -> `chunks` vectors (B, 1, D): shift, 1 + scale[, gate, shift, 1 + scale, gate]."""
        return [v.unsqueeze(1) for v in (self.adaLN_modulation(c) + self._one_plus).chunk(self.chunks, dim=1)]

    def qkv_heads(self, x: torch.Tensor, mod: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x (B, S, D) -> q, k, v (B, H, S, Dh), QK-normed in fp32."""
        B, S, D = x.shape
        h = torch.addcmul(mod[0], self.norm1(x), mod[1])
        q, k, v = self.qkv(h).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        return q, k, v

    def post(self, x: torch.Tensor, attn: torch.Tensor, mod: list[torch.Tensor]) -> torch.Tensor:
        """The residual updates after attention: x + gate * proj(attn), then x + gate * mlp(adaLN(x))."""
        _, _, gate_a, shift_m, scale1_m, gate_m = mod
        x = torch.addcmul(x, gate_a, self.proj(attn))
        return torch.addcmul(x, gate_m, self.mlp(torch.addcmul(shift_m, self.norm2(x), scale1_m)))


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                    capture: Optional[list] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v over the joint sequence: q (B, H, Q, Dh), k and v (B, H, T, Dh),
    key_mask (B, T) bool (False: a text pad, never attended to). Returns (B, H, Q, Dh). bf16 on the CPU is
    written out (fp32 softmax), as layers.bf16_attention_cpu, for the same reason: PyTorch's CPU SDPA is
    slow in bf16. `capture`: a list that the probabilities (B, H, Q, T) are appended to."""
    scale = q.shape[-1] ** -0.5
    if capture is not None:
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale
        capture.append(torch.softmax(scores.masked_fill(~key_mask[:, None, None], -torch.inf), -1).detach())
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            scores = (q @ k.transpose(-2, -1)).float() * scale
            probs = torch.softmax(scores.masked_fill(~key_mask[:, None, None], -torch.inf), -1).to(q.dtype)
            return probs @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None])


class MMDiTBlock(nn.Module):
    """One MM-DiT block (Esser et al. 2024, fig. 2b): two streams, one joint attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, last: bool = False):
        super().__init__()
        self.text = Stream(dim, num_heads, mlp_ratio, qk_norm, pre_only=last)
        self.image = Stream(dim, num_heads, mlp_ratio, qk_norm)
        self.capture: Optional[list] = None  # set to a list to collect attention probabilities (viz)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, c: torch.Tensor,
                key_mask: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """txt (B, L, D), img (B, N, D), c (B, D), key_mask (B, L + N) -> (txt or None after the last block, img)."""
        B, L, D = txt.shape
        mod_t, mod_i = self.text.modulation(c), self.image.modulation(c)
        qt, kt, vt = self.text.qkv_heads(txt, mod_t)
        qi, ki, vi = self.image.qkv_heads(img, mod_i)
        k, v = torch.cat([kt, ki], dim=2), torch.cat([vt, vi], dim=2)  # (B, H, T, Dh), text first
        # a pre-only text stream's queries would be thrown away: the image's attend alone
        q = qi if self.text.pre_only else torch.cat([qt, qi], dim=2)
        out = joint_attention(q, k, v, key_mask, self.capture).transpose(1, 2).reshape(B, -1, D)  # (B, Q, D)
        if self.text.pre_only:
            return None, self.image.post(img, out, mod_i)
        return self.text.post(txt, out[:, :L], mod_t), self.image.post(img, out[:, L:], mod_i)


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config.validate()
        self.grid = c.input_size // c.patch_size
        self.num_tokens = self.grid * self.grid
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        # the pooled text vector's embedding, added to the timestep's (SD3's "y" path: an MLP)
        self.pooled_embedder = nn.Sequential(Linear(c.text_dim, c.hidden_size), nn.SiLU(),
                                             Linear(c.hidden_size, c.hidden_size))
        self.context_embedder = Linear(c.text_dim, c.hidden_size)  # text token states: 384 -> D
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, self.grid, self.grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList(MMDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm,
                                               last=i == c.depth - 1) for i in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's: xavier-uniform linears, the patch map like a linear, N(0, 0.02) timestep MLP; the adaLN
        # modulations and the output layer stay zero (adaLN-Zero), as set in their constructors
        zero = {id(b.text.adaLN_modulation[-1]) for b in self.blocks} | {
            id(b.image.adaLN_modulation[-1]) for b in self.blocks} | {
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

    null_label = None  # no classes: guidance's null is the empty prompt (Condition.null)

    def _text(self, cond: Condition | None, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cond is None or cond.tokens is None or cond.mask is None or cond.pooled is None:
            raise UsageError("MM-DiT is a text model: pass a text condition (tokens, mask, pooled), e.g. "
                             "model.text_encoder.condition(prompts)")
        if cond.tokens.shape[0] != batch or cond.tokens.shape[-1] != self.config.text_dim:
            raise UsageError(f"MM-DiT: text tokens {tuple(cond.tokens.shape)} for a batch of {batch} images; "
                             f"expected ({batch}, L, {self.config.text_dim})")
        return cond.tokens, cond.mask.to(torch.bool), cond.pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | None = None, *,
                hidden_at: Optional[int] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), t (B,) as the objective defines it, cond a text condition -> (B, C, H, W).
        hidden_at = k: also the image tokens after block k, (B, N, D) (objectives.base.Dispersion)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        B = x.shape[0]
        tokens, mask, pooled = self._text(cond, B)
        in_dtype, dtype = x.dtype, self.pos_embed.dtype
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(dtype))  # (B, D)
        txt = self.context_embedder(tokens.to(dtype))  # (B, L, D)
        img = self.x_embedder(x.to(dtype)) + self.pos_embed  # (B, N, D)
        key_mask = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)  # (B, L + N): image keys always real
        if hidden_at is not None and not 1 <= hidden_at <= len(self.blocks):
            raise UsageError(f"hidden_at {hidden_at}: this MM-DiT has blocks 1 to {len(self.blocks)}")
        hidden = None
        for i, block in enumerate(self.blocks, 1):
            txt, img = block(txt, img, c, key_mask)
            if i == hidden_at:
                hidden = img
        out = self.final_layer(img, c)  # (B, N, P*P*C)
        cfg = self.config
        out = unpatchify(out, cfg.patch_size, cfg.in_channels, cfg.input_size, cfg.input_size).to(in_dtype)
        return out if hidden_at is None else (out, hidden)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Word-to-patch attention maps (as Prompt-to-Prompt's cross-attention maps, Hertz et al. 2022): in
        every block, each image patch's attention on the real text tokens, renormalised over them and
        averaged over heads: (B, depth, L, grid, grid); map [b, k, j] shows where word j is read in block k.
        Padding tokens' maps are zero."""
        for b in self.blocks:
            b.capture = []
        try:
            self(x, t, cond)
            L = cond.tokens.shape[1]
            # (B, H, N, L): image queries (the last block's queries are the image's only) on text keys
            parts = [b.capture[0][:, :, -self.num_tokens:, :L] for b in self.blocks]
        finally:
            for b in self.blocks:
                b.capture = None
        maps = torch.stack([(p / p.sum(-1, keepdim=True).clamp(min=1e-12)).mean(1) for p in parts], 1)  # (B, k, N, L)
        maps = maps.transpose(2, 3) * cond.mask[:, None, :, None].to(maps.dtype)  # (B, depth, L, N)
        return maps.reshape(*maps.shape[:3], self.grid, self.grid)


def model_config(name: str, *, input_size: int = 28, in_channels: int = 1, num_classes: int = 0,
                 **overrides: Any) -> MMDiTConfig:
    """The resolved config of preset `name` (MMDiT-*) for a data shape; `overrides` change any field."""
    if name not in PRESETS:
        raise UsageError(f"unknown model {name!r}; allowed: {', '.join(PRESETS)}")
    return MMDiTConfig(**{**PRESETS[name], "input_size": input_size, "in_channels": in_channels,
                          "num_classes": num_classes, **overrides}).validate()


from .registry import Family  # noqa: E402  (the registry imports this module lazily, by name)

FAMILY = Family("mmdit", MMDiTConfig, MMDiT, PRESETS,
                description="MM-DiT (SD3): text and image streams joined in one attention; conditioned on prompts")
