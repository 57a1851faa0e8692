"""DiT: Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

patchify -> + position embedding -> N blocks with adaLN-Zero on c = emb(t) + emb(class) -> adaLN final
layer -> unpatchify. The network knows nothing of noise schedules: `net(x, t, cond)` maps an image and
a scalar time per sample to an image-shaped output whose meaning (noise, velocity, data) is the
objective's business.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..condition import Condition
from ..config_base import ConfigBase
from ..errors import UsageError
from .registry import Family
from .layers import (MLPS, NORMS, AdaLNZeroBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder,
                     invariant_rows, rope_2d, sincos_pos_embed_2d, unpatchify)


@dataclass
class DiTConfig(ConfigBase):
    KIND = "DiT"
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
    # LightningDiT's block parts (Yao et al. 2025), each off by default (DiT's own):
    norm: str = "layernorm"  # or "rmsnorm"
    qk_norm: bool = False  # RMSNorm with a gain on each head's queries and keys
    mlp: str = "gelu"  # or "swiglu" (2/3 the hidden width: the same parameters)
    rope: bool = False  # 2-D rotary position angles in attention, on top of the absolute embedding
    # diffusers' DiT's parts (ditkit.interop.diffusers), off by default:
    time_freq_shift: int = 0  # timestep frequencies 10000^(-i/(128 - shift)): 0 facebookresearch/DiT's, 1 diffusers'
    learn_sigma: bool = False  # the final layer also outputs a variance (2C channels; forward returns the first C)

    def validate(self) -> "DiTConfig":
        if self.input_size < 1 or self.input_size % self.patch_size:
            raise UsageError(f"image size {self.input_size} must be a positive multiple of the patch size {self.patch_size}")
        if self.in_channels not in (1, 3, 4):
            raise UsageError(f"in_channels={self.in_channels}: allowed values are 1 and 3 (images), 4 (VAE latents)")
        if self.time_freq_shift not in (0, 1):
            raise UsageError(f"time_freq_shift={self.time_freq_shift}: allowed 0 (facebookresearch/DiT) and 1 (diffusers)")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise UsageError(f"sin-cos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.pos_embed not in ("sincos", "learned"):
            raise UsageError(f"pos_embed={self.pos_embed!r}: allowed values are 'sincos' and 'learned'")
        if self.gelu_approximate not in ("none", "tanh"):
            raise UsageError(f"gelu_approximate={self.gelu_approximate!r}: allowed 'none' and 'tanh'")
        if self.norm not in NORMS:
            raise UsageError(f"norm={self.norm!r}: allowed {', '.join(NORMS)}")
        if self.mlp not in MLPS:
            raise UsageError(f"mlp={self.mlp!r}: allowed {', '.join(MLPS)}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise UsageError(f"rope needs a head width (hidden_size / num_heads = "
                             f"{self.hidden_size // self.num_heads}) divisible by 4")
        if self.num_classes < 0:
            raise UsageError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        return self


class DiT(nn.Module):
    _compiled_count = 0  # networks compiled for inference in this process

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.grid = c.input_size // c.patch_size
        self.num_tokens = self.grid * self.grid
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, freq_shift=c.time_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size) if c.num_classes > 0 else None
        pos = torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, self.grid, self.grid)).float().unsqueeze(0)
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos.clone())  # initialised at the sin-cos values
        else:
            self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList(
            AdaLNZeroBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.gelu_approximate, norm=c.norm, qk_norm=c.qk_norm,
                           mlp=c.mlp) for _ in range(c.depth))
        self.out_channels = 2 * c.in_channels if c.learn_sigma else c.in_channels
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels, c.norm)
        cos, sin = rope_2d(c.hidden_size // c.num_heads, self.grid) if c.rope else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)  # (N, head width), fixed; None without RoPE
        self.register_buffer("rope_sin", sin, persistent=False)
        self.modulation_cache: Optional[ModulationCache] = ModulationCache()  # None turns the memo off
        self._compiled_trunk = None  # set by compile_for_inference()
        self.compiled_min_batch = 1
        # training only: recompute each block's activations in the backward instead of keeping them
        # (`ditkit train --grad-checkpoint`): less memory, one more forward of the blocks a step
        self.grad_checkpoint = False
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

    def modulations(self, t: torch.Tensor, cond: Condition | None) -> list[torch.Tensor]:
        """`modulation(c)` of every block, then of the final layer: [(B, 6D)] * depth + [(B, 2D)].

        These depend on (t, class) only. Under `torch.no_grad()` on the CPU they are memoised per
        (t, class) in `self.modulation_cache`: a sampler asks for the same few noise levels and classes
        at every call, and this path is 7 of the 25 matrix products of a forward (a quarter of the
        latency of one image). Each entry is computed exactly as without the cache, so results do not change.
        Not in training mode: a no-grad forward inside training (model guidance's unconditional
        prediction) sees fresh random times and weights at every step, which a memo only slows down.
        """
        if torch.is_grad_enabled() or self.training or self.modulation_cache is None or t.device.type != "cpu":
            return self.modulations_of(self.embed_condition(t, cond))
        return self.modulation_cache.lookup(self, t, cond)

    def modulations_of(self, c: torch.Tensor) -> list[torch.Tensor]:
        """The same list from the embedded condition c (B, D)."""
        return [b.modulation(c) for b in self.blocks] + [self.final_layer.modulation(c)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition | None = None, *,
                hidden_at: Optional[int] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), t (B,) float time as the objective defines it, cond -> (B, C, H, W).

        hidden_at = k (1 <= k <= depth): return (output, the tokens after block k, (B, N, D)) instead, for
        a loss on the network's representation (objectives.base.Dispersion); the eager trunk runs."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        in_dtype = x.dtype
        x = x.to(self.pos_embed.dtype)  # a bf16 inference copy takes and returns the sampler's fp32
        mods = self.modulations(t, cond)
        if hidden_at is not None:
            if not 1 <= hidden_at <= len(self.blocks):
                raise UsageError(f"hidden_at {hidden_at}: this DiT has blocks 1 to {len(self.blocks)}")
            out, hidden = self._trunk(x, mods, hidden_at)
            return out.to(in_dtype), hidden
        if self._compiled_trunk is not None and not torch.is_grad_enabled():
            return self._run_compiled(x, mods).to(in_dtype)
        return self._trunk(x, mods).to(in_dtype)

    def _trunk(self, x: torch.Tensor, mods: list[torch.Tensor],
               hidden_at: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Everything per token: patchify, the blocks, the final layer, unpatchify (the condition path,
        `mods`, is computed, and memoised, outside). With hidden_at = k >= 1, also the tokens after block k."""
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        hidden = None
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        checkpointed = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, (block, mod) in enumerate(zip(self.blocks, mods), 1):
            if checkpointed:  # non-reentrant: the recomputation replays the same kernels, so the same bits
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, mod=mod, rope=rope, use_reentrant=False)
            else:
                tokens = block(tokens, mod=mod, rope=rope)
            if i == hidden_at:
                hidden = tokens
        out = self.final_layer(tokens, mod=mods[-1])  # (B, N, P*P*C)
        cfg = self.config
        out = unpatchify(out, cfg.patch_size, self.out_channels, cfg.input_size, cfg.input_size)
        if cfg.learn_sigma:  # the prediction; the variance channels (a DDPM's learned sigma) go unused
            out = out[:, :cfg.in_channels]
        return out if hidden is None else (out, hidden)

    # -- compiled inference ------------------------------------------------------------------------
    def compile_for_inference(self) -> None:
        """Run the per-token trunk through `torch.compile` (inductor, with frozen weights) at inference.

        On this project's CPU a compiled forward is 10-25% faster: inductor fuses the layer norms,
        adaLN multiply-adds, GELU and residuals between the matrix products, which at DiT-T's sizes
        cost as much as the products themselves. The first call compiles (measured on an AVX2-only host's
        2 cores: ~18 s, ~43 s with an empty inductor cache; it needs a C++ compiler on the CPU). One graph,
        dynamic in the batch alone, serves every batch size: a batch smaller than `compiled_min_batch` is padded up to it, so that every matrix product has at least
        its probed number of rows (see `layers.invariant_rows`) and an image keeps the same bits at any
        batch size. Compiled images differ from eager ones in their last bits (fused arithmetic), like
        bf16 from fp32: "one seed, one image" holds within each mode.

        The weights are constants of the compiled graph: compile a model whose weights are final (an
        inference copy, `eval()` and `requires_grad_(False)`); with gradients enabled the eager trunk runs.
        Compilation runs now (one forward of the smallest batch); if it fails, the network stays eager
        and the error is raised.
        """
        if self.training or any(p.requires_grad for p in self.parameters()):
            raise UsageError("compile_for_inference: the model must be an inference copy "
                             "(call .eval().requires_grad_(False) first); its weights are frozen into the graph")
        dev = self.pos_embed.device
        floor = 1
        if dev.type == "cpu":
            dtype = self.pos_embed.dtype
            floor = max(invariant_rows(k, n, dtype) for k, n in self._token_products())
        self.compiled_min_batch = max(2, -(-floor // self.num_tokens))  # >= 2: one graph for every batch
        # dynamo keeps its graphs per code object (`_trunk`, shared by every DiT) and, past a limit, would
        # fall back to eager without a word: leave room for every network this process compiles
        DiT._compiled_count += 1
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, 2 * DiT._compiled_count + 8)
        # Only the batch is symbolic (marked in `_run_compiled`): `dynamic=True` made every size symbolic,
        # and tracing those took twice as long (AVX2 host: 39 s against 18 s) for no faster a graph.
        self._compiled_trunk = torch.compile(self._trunk, dynamic=None, options={"freezing": True})
        c = self.config
        x = torch.zeros(self.compiled_min_batch, c.in_channels, c.input_size, c.input_size, device=dev,
                        dtype=self.pos_embed.dtype)
        cond = None
        if self.y_embedder is not None:
            cond = Condition.from_labels(torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=dev),
                                         c.num_classes)
        try:
            with torch.no_grad():
                self(x, torch.full((x.shape[0],), 0.5, device=dev), cond)
        except Exception:
            self._compiled_trunk = None
            raise

    @property
    def compiled(self) -> bool:
        """Whether inference runs through the compiled trunk (`compile_for_inference`)."""
        return self._compiled_trunk is not None

    def _token_products(self) -> list[tuple[int, int]]:
        """(K, N) of every matrix product of the trunk, each applied to B * num_tokens rows: read from the
        layers themselves (the patch embedding, a block's attention and MLP maps, the output map), so that
        every block variant is covered; the adaLN modulations are applied to B rows only, and left out."""
        c = self.config
        block = self.blocks[0] if len(self.blocks) else None
        maps = [] if block is None else [m for part in (block.attn, block.mlp) for m in part.modules()
                                         if isinstance(m, nn.Linear)]
        return ([(c.patch_size ** 2 * c.in_channels, c.hidden_size)] + [(m.in_features, m.out_features) for m in maps]
                + [(self.final_layer.linear.in_features, self.final_layer.linear.out_features)])

    def _run_compiled(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        B, pad = x.shape[0], max(self.compiled_min_batch - x.shape[0], 0)
        # Padded with zero images and modulations (their rows are dropped, and never mix with the others).
        # `cat` copies even when pad is 0: the graph always gets fresh, contiguous tensors. The modulation memo
        # hands back views of one table; dynamo guards on that aliasing, and recompiled (~30 s) on the first
        # padded batch when the others came as views.
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        mods = [torch.cat([m, m.new_zeros(pad, m.shape[1])]) for m in mods]
        for a in (x, *mods):  # the batch is the graph's one dynamic size
            torch._dynamo.mark_dynamic(a, 0)
        return self._compiled_trunk(x, mods)[:B]


class ModulationCache:
    """Inference memo of a DiT's condition path: (t, class) -> the adaLN modulations of all its layers.

    Bounded (least recently used entries go first) and self-invalidating: it is emptied whenever a
    parameter of the condition path changes (an optimiser or EMA step, `load_state_dict`, `.to()`),
    detected through the parameters' version counters and storage.
    """

    def __init__(self, max_entries: int = 4096):
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: must be >= 1")
        self.max_entries = max_entries
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._stamp: Optional[tuple] = None
        self._net: Optional["DiT"] = None  # the net whose condition-path parameters are listed below
        self._params: list[torch.Tensor] = []
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self._stamp = None

    def _condition_params(self, net: "DiT") -> list[torch.Tensor]:
        if self._net is not net:  # listed once per net, not at every forward
            mods = [net.t_embedder] + ([net.y_embedder] if net.y_embedder is not None else [])
            mods += [b.adaLN_modulation for b in net.blocks] + [net.final_layer.adaLN_modulation]
            self._net, self._params, self._stamp = net, [p for m in mods for p in m.parameters()], None
        return self._params

    def lookup(self, net: "DiT", t: torch.Tensor, cond: Condition | None) -> list[torch.Tensor]:
        stamp = tuple((p._version, p.data_ptr(), p.dtype) for p in self._condition_params(net))
        if stamp != self._stamp:
            self._store.clear()
            self._stamp = stamp
        if net.y_embedder is None:
            labels = [None] * t.shape[0]  # an unconditional net ignores labels, and so does its memo
        elif cond is None or cond.labels is None:
            net.embed_condition(t, cond)  # raises the clear error
        else:
            labels = cond.labels.tolist()
        keys = list(zip(t.tolist(), labels))
        unique = list(dict.fromkeys(keys))
        missing = [k for k in unique if k not in self._store]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            mt = torch.tensor([k[0] for k in missing], dtype=t.dtype)
            mcond = None
            if net.y_embedder is not None:
                mcond = Condition.from_labels(torch.tensor([k[1] for k in missing], dtype=torch.long), net.config.num_classes)
            rows = torch.cat(net.modulations_of(net.embed_condition(mt, mcond)), dim=1)
            for k, row in zip(missing, rows):
                self._store[k] = row.clone()
        for k in unique:
            self._store.move_to_end(k)
        table = torch.stack([self._store[k] for k in unique])
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        if len(unique) < len(keys):
            where = {k: i for i, k in enumerate(unique)}
            table = table[torch.tensor([where[k] for k in keys])]
        D = net.config.hidden_size
        return list(table.split([6 * D] * len(net.blocks) + [2 * D], dim=1))


# depth, width, heads, patch: the tutorial's Tiny and the paper's S/B/L/XL shapes (Peebles & Xie, table 1).
DIT_PRESETS: dict[str, dict[str, int]] = {
    "DiT-T/2": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    "DiT-T/4": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4),
    "DiT-T/7": dict(depth=4, hidden_size=128, num_heads=4, patch_size=7),
    "DiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "DiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}

FAMILY = Family("dit", DiTConfig, DiT, DIT_PRESETS,
                description="Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023)")
