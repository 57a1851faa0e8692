"""The "vq" family: a small convolutional VQ-VAE that turns 28x28 digits into a grid of discrete codes and
back (van den Oord et al. 2017, "Neural Discrete Representation Learning"), the tokenizer of the masked
image model (ditkit.models.mim).

    image (B, C, H, W) -> encoder -> (B, E, H/f, W/f) -> nearest code -> codes (B, H/f, W/f) in [0, K)
    codes -> code vectors (B, E, H/f, W/f) -> decoder -> image (B, C, H, W)

f = `downsample` (4: 28x28 -> a 7x7 grid of 49 tokens). The quantizer is `vector_quantize_pytorch`'s
`VectorQuantize`: a codebook kept as an exponential moving average of the encoder outputs assigned to
each code (van den Oord et al. 2017, appendix A.1) rather than learned by gradient, initialised by
k-means on the first batch, and codes used less than `dead_code_threshold` times (EMA count) restarted on
encoder outputs of the batch: the usual cures for codebook collapse, which a hand-written quantizer would
have to re-implement. Gradients reach the encoder through the rotation trick (Fifty et al. 2024), the
library's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config_base import ConfigBase
from ..errors import UsageError
from .registry import Family

DOWNSAMPLES = (2, 4)


@dataclass
class VQConfig(ConfigBase):
    KIND = "vq"
    input_size: int = 28
    in_channels: int = 1
    num_classes: int = 0  # a tokenizer sees no labels
    codebook_size: int = 256  # K codes
    code_dim: int = 16  # E: a code vector's width (small codes are used more evenly: Yu et al. 2022, ViT-VQGAN)
    hidden_size: int = 32  # channels at half size; h/2 at full size, doubling as the side halves
    downsample: int = 4  # f: the grid is input_size / f a side
    ema_decay: float = 0.9  # the codebook's moving average
    commitment_weight: float = 0.25  # beta of the commitment loss ||z_e - sg(z_q)||^2 (van den Oord et al. eq. 3)
    dead_code_threshold: float = 2.0  # codes whose EMA count falls below this are restarted on batch outputs
    kmeans_init: bool = True

    def validate(self) -> "VQConfig":
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise UsageError(f"vq model {field}={getattr(self, field)!r}: {allowed}")

        need(self.downsample in DOWNSAMPLES, "downsample", f"allowed {', '.join(map(str, DOWNSAMPLES))}")
        need(isinstance(self.input_size, int) and self.input_size >= self.downsample
             and self.input_size % self.downsample == 0, "input_size",
             f"must be a positive multiple of downsample ({self.downsample})")
        need(self.in_channels in (1, 3), "in_channels", "allowed 1, 3")
        need(self.num_classes == 0, "num_classes", "a tokenizer is unconditional: 0")
        need(isinstance(self.codebook_size, int) and 2 <= self.codebook_size <= 65536, "codebook_size",
             "must be an integer in [2, 65536]")
        need(isinstance(self.code_dim, int) and self.code_dim >= 1, "code_dim", "must be an integer >= 1")
        need(isinstance(self.hidden_size, int) and self.hidden_size >= 16 and self.hidden_size % 16 == 0,
             "hidden_size", "must be a multiple of 16 (GroupNorm's 8 groups at hidden_size / 2 channels)")
        need(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        need(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")
        need(self.dead_code_threshold >= 0, "dead_code_threshold", "must be >= 0 (0 = no restarts)")
        return self

    @property
    def grid_size(self) -> int:
        return self.input_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2


class ResBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x)))))): the residual unit of VQGAN's encoder/decoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQVAE(nn.Module):
    """Encoder, quantizer and decoder; `encode` and `decode` are the tokenizer's two directions."""

    def __init__(self, config: VQConfig):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.config = config.validate()
        c, h, stages = config.in_channels, config.hidden_size, int(math.log2(config.downsample))
        # channels double as the side halves: h/2 at full size, h, then 2h (e.g. 16 @ 28x28, 32 @ 14x14,
        # 64 @ 7x7 for h = 32, ~7M multiply-adds an image each way). Residual units only below full size,
        # where they are cheap: a 64-channel unit at 28x28 alone costs ~60M, and CPU time is the budget.
        widths = [h * 2 ** i // 2 for i in range(stages + 1)]
        enc: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1)]
        for i in range(stages):  # each stage halves the side: 28 -> 14 -> 7
            enc += [nn.SiLU(), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), ResBlock(widths[i + 1])]
        enc += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], config.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.code_dim, widths[-1], 3, padding=1)]
        for i in reversed(range(stages)):  # 7 -> 14 -> 28
            dec += [ResBlock(widths[i + 1]), nn.SiLU(), nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1)]
        dec += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = VectorQuantize(
            dim=config.code_dim, codebook_size=config.codebook_size, decay=config.ema_decay,
            kmeans_init=config.kmeans_init, kmeans_iters=10, threshold_ema_dead_code=config.dead_code_threshold,
            commitment_weight=config.commitment_weight, accept_image_fmap=True)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: x (B, C, H, W) in [-1, 1] -> (reconstruction (B, C, H, W), codes (B, h, w),
        commitment loss (scalar, already weighted)). In train mode the quantizer also moves its codebook
        (EMA) and restarts dead codes: this pass is not a pure function."""
        z_q, codes, commit = self.quantizer(self.encoder(x))  # (B, E, h, w), (B, h, w), ()
        return self.decoder(z_q), codes, commit

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w) int64, without touching the codebook."""
        z = self.encoder(x.to(self.quantizer.codebook.dtype))  # (B, E, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B h w, E)
        book = self.quantizer.codebook  # (K, E)
        # nearest code in L2: argmin |z|^2 - 2 z.e + |e|^2 (|z|^2 is the same for every code)
        d = book.pow(2).sum(1)[None] - 2 * flat @ book.T  # (B h w, K)
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int64 -> images (B, C, H, W), unclamped (the data's range is [-1, 1])."""
        z_q = F.embedding(codes, self.quantizer.codebook).permute(0, 3, 1, 2)  # (B, E, h, w)
        return self.decoder(z_q)


# grid 7x7 (f = 4) for 28x28 digits: 49 tokens of log2(K) bits each
PRESETS: dict[str, dict[str, Any]] = {
    "VQ-T/4": dict(hidden_size=32, code_dim=16, codebook_size=256, downsample=4),
    "VQ-S/4": dict(hidden_size=64, code_dim=16, codebook_size=512, downsample=4),
    "VQ-T/2": dict(hidden_size=32, code_dim=16, codebook_size=256, downsample=2),
}

FAMILY = Family(name="vq", config_cls=VQConfig, net_cls=VQVAE, presets=PRESETS, sampleable=False,
                description="an image tokenizer (VQ-VAE): give it to `ditkit train --tokenizer`")
