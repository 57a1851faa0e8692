"""U-Net: diffusers' `UNet2DModel` (Ho et al. 2020's DDPM U-Net, as in Song et al. 2021 and diffusers)
behind ditkit's network contract, as the convolutional baseline a DiT is measured against.

`net(x, t, cond)` maps an image (B, C, H, W) and a time per sample (B,) to an image-shaped output, and
knows no noise schedule, exactly like `DiT`: every objective, sampler, guidance mode, eval and the server
take it unchanged. The network is diffusers' own; this module only chooses its blocks from a config,
maps ditkit's `Condition` onto its class embedding, and passes the objective's time through.

Resolution: each level but the last halves the image (a stride-2 conv), and diffusers' `UNet2DModel`
upsamples by exactly 2 without being told the skip's size, so the image side must divide by
2 ** (levels - 1). MNIST's 28 takes three levels with no padding, 28 -> 14 -> 7 (the presets); a fourth
level would need 28 padded to 32 and cropped back, which these presets do not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..condition import Condition
from ..config_base import ConfigBase
from ..errors import UsageError
from .registry import Family


@dataclass
class UNetConfig(ConfigBase):
    KIND = "U-Net"
    input_size: int = 28  # square images, H = W; must divide by 2 ** (levels - 1)
    in_channels: int = 1
    num_classes: int = 10  # 0 = unconditional; the null (guidance) class id is num_classes
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels of each resolution level, full size first
    layers_per_block: int = 1  # resnet blocks per level on the way down (up: one more, as in diffusers)
    attention: tuple[bool, ...] = (False, True, True)  # self-attention after each resnet of a level
    mid_attention: bool = True  # self-attention in the middle block, at the lowest resolution
    attention_head_dim: int = 32  # channels per head: a level of C channels has C // 32 heads
    norm_num_groups: int = 8  # GroupNorm groups; must divide every level's channels

    def __post_init__(self) -> None:
        # JSON gives lists; the config compares and hashes as tuples
        for name in ("block_out_channels", "attention"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise UsageError(f"{name}={value!r}: must be a list, one value per resolution level")
            setattr(self, name, tuple(value))

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def depth(self) -> int:
        """The places `UNet.forward(..., hidden_at=k)` can read: the output of down level k (1..levels),
        then the middle block (levels + 1). What a DiT's depth is to its blocks (--dispersive's default
        block is depth // 2)."""
        return self.levels + 1

    def validate(self) -> "UNetConfig":
        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not self.block_out_channels or not all(positive_int(c) for c in self.block_out_channels):
            raise UsageError(f"block_out_channels={list(self.block_out_channels)}: must be one or more channel "
                             "counts >= 1, one per resolution level")
        if len(self.attention) != self.levels or not all(isinstance(a, bool) for a in self.attention):
            raise UsageError(f"attention={list(self.attention)}: must be {self.levels} true/false values, one per "
                             f"level of block_out_channels={list(self.block_out_channels)}")
        if not positive_int(self.input_size) or self.input_size % 2 ** (self.levels - 1):
            raise UsageError(f"image size {self.input_size}: a U-Net of {self.levels} levels halves it "
                             f"{self.levels - 1} times, so it must be a positive multiple of {2 ** (self.levels - 1)}"
                             f" (28 allows 1 to 3 levels)")
        if self.in_channels not in (1, 3):
            raise UsageError(f"in_channels={self.in_channels}: allowed values are 1 and 3")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise UsageError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not positive_int(self.layers_per_block):
            raise UsageError(f"layers_per_block={self.layers_per_block}: must be a whole number >= 1")
        if not isinstance(self.mid_attention, bool):
            raise UsageError(f"mid_attention={self.mid_attention!r}: allowed true and false")
        if not positive_int(self.norm_num_groups) or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise UsageError(f"norm_num_groups={self.norm_num_groups}: must divide every level's channels "
                             f"{list(self.block_out_channels)}")
        attended = [c for c, a in zip(self.block_out_channels, self.attention) if a]
        attended += [self.block_out_channels[-1]] if self.mid_attention else []
        if not positive_int(self.attention_head_dim) or any(c % self.attention_head_dim for c in attended):
            raise UsageError(f"attention_head_dim={self.attention_head_dim}: must divide the channels of every "
                             f"level with attention {attended}")
        return self


class UNet(nn.Module):
    """diffusers' `UNet2DModel` with ditkit's `forward(x, t, cond)`.

    Class conditioning is diffusers' own: an embedding table of `num_classes + 1` rows (the last one the
    null class that guidance and label dropout use) whose row is added to the time embedding, which every
    resnet block then adds to its features (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021, sec. 3).
    """

    def __init__(self, config: UNetConfig):
        # imported here: the family registry imports this module to list presets, and diffusers takes seconds
        from diffusers import UNet2DModel

        super().__init__()
        self.config = c = config.validate()
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in c.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention))
        self.unet = UNet2DModel(
            sample_size=c.input_size, in_channels=c.in_channels, out_channels=c.in_channels,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            down_block_types=down, up_block_types=up, add_attention=c.mid_attention,
            attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
            # DDPM's sinusoidal time embedding (flip_sin_to_cos, no shift: diffusers' DDPM defaults)
            time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
            num_class_embeds=c.num_classes + 1 if c.num_classes > 0 else None)

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def muon_parameters(self) -> list[str]:
        """The hidden weights `--optimizer muon` takes (`train.optim.muon_parameters`): the conv kernels and
        attention matrices of the down, middle and up blocks (a kernel taken as the matrix (out, in * 3 * 3),
        as Jordan et al. 2024 ran Muon on convolutional networks). Not the first and last convolutions, the
        time and class embeddings, each resnet's projection of the time embedding (a per-condition shift,
        what a DiT's adaLN modulations are), biases or norms: those stay on AdamW."""
        return [f"unet.{n}" for n, p in self.unet.named_parameters()
                if p.ndim >= 2 and n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")
                and "time_emb_proj" not in n]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | None = None, *,
                hidden_at: Optional[int] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), t (B,) float time as the objective defines it, cond -> (B, C, H, W).

        t goes to the network as given. Both objective families feed a time on DDPM's 0-1000 scale (DDPM:
        the fractional timestep index in [0, T), T = 1000 by default; the interpolants: 1000 t for t in
        [0, 1], `interpolant.TIME_SCALE`), which is the range diffusers' sinusoidal embedding
        (max period 10000) was built for; fractions are kept (the embedding is continuous in t).

        hidden_at = k: also return the features after down level k (1..levels) or, k = levels + 1, after
        the middle block, (B, C_k, H_k, W_k), for a loss on the representation (objectives.base.Dispersion).
        """
        c = self.config
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        labels = None
        if c.num_classes > 0:
            if cond is None or cond.labels is None:
                raise ValueError("this U-Net is class-conditional: pass Condition.from_labels(...) "
                                 f"(use label {c.num_classes} for the null class)")
            labels = cond.labels.to(x.device)
        # the weights' dtype: a bf16 inference copy takes and returns the sampler's fp32
        dtype = self.unet.conv_in.weight.dtype
        if hidden_at is None:
            return self.unet(x.to(dtype), t, class_labels=labels).sample.to(x.dtype)
        if not 1 <= hidden_at <= c.depth:
            raise UsageError(f"hidden_at {hidden_at}: this U-Net has down levels 1 to {c.levels} and its middle "
                             f"block at {c.depth}")
        module = self.unet.down_blocks[hidden_at - 1] if hidden_at <= c.levels else self.unet.mid_block
        seen: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen.append(output[0] if isinstance(output, tuple) else output)  # a down block: (features, skips)

        handle = module.register_forward_hook(keep)
        try:
            out = self.unet(x.to(dtype), t, class_labels=labels).sample
        finally:
            handle.remove()
        return out.to(x.dtype), seen[0]


# Sized against ditkit's DiTs (parameters at 28x28, 1 channel, 10 classes): UNet-T 1.16M to DiT-T/4's
# 1.28M, UNet-S 31.7M to DiT-S/4's 32.5M. Three levels, 28 -> 14 -> 7; attention at 14x14 and 7x7 only
# (at 28x28 it would cost 16x the 7x7 level's attention for the same weights).
PRESETS: dict[str, dict[str, Any]] = {
    "UNet-T": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention=(False, True, True),
                   mid_attention=True, attention_head_dim=32, norm_num_groups=8),
    "UNet-S": dict(block_out_channels=(96, 192, 352), layers_per_block=2, attention=(False, True, True),
                   mid_attention=True, attention_head_dim=32, norm_num_groups=32),
}

FAMILY = Family(name="unet", config_cls=UNetConfig, net_cls=UNet, presets=PRESETS,
                description="diffusers' UNet2DModel, class-conditional: the convolutional baseline")
