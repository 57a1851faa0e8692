"""Dynamic compute at sampling: reuse the deep blocks' work between neighbouring network evaluations.

Neighbouring steps of a sampler feed the network nearly the same image at nearly the same noise level,
and the deep blocks of a DiT change their contribution slowly along the trajectory (DeepCache, Ma et al.
2024, for U-Nets; Δ-DiT, Chen et al. 2024, "Δ-DiT: A Training-Free Acceleration Method Tailored for
Diffusion Transformers", for DiTs). So every `interval`-th evaluation runs the whole trunk and keeps the
deviation the back blocks added,

    Δ = h_L - h_s        (tokens after the last block minus tokens after block s; (B, N, D)),

and the evaluations in between run the front blocks 1..s only and add the kept Δ before the final layer:

    h_L ≈ h_s(x_t) + Δ(x_t')      (t' the last fully computed evaluation).

Each cached evaluation costs s / L of the trunk (plus patchify and the final layer). The state lives in a
`DeltaCache` made for one `sample_batch` call and dropped with it (no state in the network or the sampler):
it keys its entries by the batch size of the call, so a guided sampler's (2B) and unguided (B) calls,
which a guidance interval mixes, each reuse their own Δ.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..condition import Condition
from ..errors import UsageError
from ..models.layers import unpatchify

# Front blocks recomputed at a cached evaluation: a quarter of the trunk (at least one block). Measured on a
# trained DiT-T/4 (benchmarks/dynamic_compute.py): see docs/BENCHMARKS.md, "Cost levers".
FRONT_FRACTION = 0.25


def front_blocks(depth: int) -> int:
    """Blocks recomputed at a cached evaluation of a `depth`-block trunk."""
    return max(1, round(depth * FRONT_FRACTION))


def check_cache_interval(net: nn.Module, interval: int) -> None:
    """A UsageError unless `interval` >= 1 and, for interval > 1, the network is a DiT-style block trunk."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise UsageError(f"--cache-interval {interval!r}: must be an integer >= 1 (1 = off; k = the whole "
                         "network every k-th evaluation, its front blocks only in between)")
    if interval > 1:
        missing = [a for a in ("blocks", "x_embedder", "final_layer", "modulations") if not hasattr(net, a)]
        if missing or len(net.blocks) < 2:
            raise UsageError(f"--cache-interval {interval}: needs a DiT-style trunk of >= 2 blocks; "
                             f"{type(net).__name__} has none")


class DeltaCache(nn.Module):
    """`net` with Δ-caching of its back blocks (see the module docstring): the same call contract,
    `forward(x, t, cond) -> (B, C, H, W)`. Inference only (no gradients); the trunk runs eagerly."""

    def __init__(self, net: nn.Module, interval: int, front: Optional[int] = None):
        super().__init__()
        check_cache_interval(net, interval)
        self.net = net
        self.interval = interval
        self.front = front_blocks(len(net.blocks)) if front is None else front
        if not 1 <= self.front < len(net.blocks):
            raise UsageError(f"cache front blocks {self.front}: must be in 1..{len(net.blocks) - 1}")
        self._delta: dict[int, torch.Tensor] = {}  # batch size -> Δ (B, N, D)
        self._calls: dict[int, int] = {}
        self.full = self.cached = 0  # evaluations of each kind, for reports

    @property
    def config(self):
        return self.net.config

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        net = self.net
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        in_dtype = x.dtype
        x = x.to(net.pos_embed.dtype)
        mods = net.modulations(t, cond)  # [(B, 6D)] * depth + [(B, 2D)], memoised per (t, class)
        B = x.shape[0]
        n = self._calls.get(B, 0)
        self._calls[B] = n + 1
        reuse = n % self.interval != 0 and B in self._delta
        rope = (net.rope_cos, net.rope_sin) if getattr(net, "rope_cos", None) is not None else None
        h = net.x_embedder(x) + net.pos_embed  # (B, N, D)
        for block, mod in zip(net.blocks[:self.front], mods):
            h = block(h, mod=mod, rope=rope)
        if reuse:
            h = h + self._delta[B]
            self.cached += 1
        else:
            h_front = h
            for block, mod in zip(net.blocks[self.front:], mods[self.front:-1]):
                h = block(h, mod=mod, rope=rope)
            self._delta[B] = h - h_front
            self.full += 1
        out = net.final_layer(h, mod=mods[-1])  # (B, N, P*P*C_out)
        c = net.config
        out = unpatchify(out, c.patch_size, getattr(net, "out_channels", c.in_channels), c.input_size, c.input_size)
        if getattr(c, "learn_sigma", False):  # as DiT._trunk: the variance channels go unused
            out = out[:, :c.in_channels]
        return out.to(in_dtype)
