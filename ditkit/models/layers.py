"""Layers shared by every ditkit network (DiT, and later MM-DiT and the masked-token transformer).

Shapes: B batch, N tokens, D width, H heads, P patch size, C channels.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# CPU GEMM kernels (oneDNN / MKL) pick their blocking and, for few rows, split the reduction over
# threads, so a row's result changes in its last bits with the number of rows computed together: an
# image's output would depend on the images beside it. Running a linear map on at least
# `invariant_rows(K, N)` rows (zero rows are appended and dropped) makes each image's result independent
# of its batch: the "one seed, one image" contract of docs/DESIGN.md then holds bit for bit. How many rows
# that takes depends on the shape, the dtype and the thread count (measured here with 2 threads, fp32:
# K = 512 -> 16 rows, K = 1536 -> 187, K = 4608 -> 572; bf16: K = 512 -> 128), so it is probed once per
# (K, N, dtype, threads) on this machine, from MIN_GEMM_ROWS up in powers of two. Cost: nil at training
# batch sizes; at inference a few padded rows on small batches.
MIN_GEMM_ROWS = 64
_PROBE_ROWS = 2048  # probed row counts stay below this (larger products agree with it: checked to 8192)
_PROBED = (1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 48, 49, 63, 64, 65, 98, 127, 128, 129, 196, 255, 256, 257,
           392, 511, 512, 513, 784, 1023, 1024, 1025, 1568)
_LOW_PRECISION_DRAWS = 6
_invariant_rows: dict[tuple, int] = {}


def invariant_rows(k: int, n: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows from which this CPU's (M, k) x (k, n) GEMM gives every row the same bits for any M.

    Probed once per (k, n, dtype, thread count) against a 2048-row product, over 33 row counts
    (~0.1 s for DiT-T's shapes, ~1 s for DiT-XL's)."""
    key = (k, n, dtype, torch.get_num_threads())
    rows = _invariant_rows.get(key)
    if rows is None:
        g = torch.Generator().manual_seed(0)
        # In fp32 a changed summation order shows in the last bits of nearly every output. A bf16 result
        # is rounded to 8 bits, which hides most such changes (one product in a few hundred shows it),
        # so bf16 is probed over several draws, with and without a bias.
        draws = 1 if dtype == torch.float32 else _LOW_PRECISION_DRAWS
        bad: set[int] = set()
        for d in range(draws):
            x = torch.randn(_PROBE_ROWS, k, generator=g).to(dtype)
            w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
            b = (torch.randn(n, generator=g) * (0.02, 1.0, 0.0)[d % 3]).to(dtype)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                ref = F.linear(x, w, b)
                bad.update(m for m in _PROBED if not torch.equal(F.linear(x[:m], w, b), ref[:m]))
        rows = MIN_GEMM_ROWS
        while bad and rows <= max(bad):
            rows *= 2
        rows = _invariant_rows[key] = min(rows, _PROBE_ROWS)
    return rows


def _rows_needed(k: int, n: int, dtype: torch.dtype) -> int:
    """The row floor for a CPU product: probed, except under CPU autocast (bf16 training), whose kernels
    are not probed and where the fixed MIN_GEMM_ROWS applies (training needs no batch invariance;
    inference runs without autocast, its weights in fp32 or bf16, and is probed in that dtype)."""
    return MIN_GEMM_ROWS if torch.is_autocast_enabled("cpu") else invariant_rows(k, n, dtype)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) whose per-row result does not depend on how many rows x has: on the CPU,
    fewer rows than the probed floor are computed as the first rows of a zero-padded product."""
    if torch.compiler.is_compiling():
        # inside a compiled graph: a compiled inference DiT pads its batch to the floor beforehand
        # (DiT.compile_for_inference), and compiled training needs no batch invariance
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if 0 < rows < _PROBE_ROWS and x.device.type == "cpu":
        need = _rows_needed(weight.shape[1], weight.shape[0], x.dtype)
        if rows < need:
            flat = x.reshape(rows, x.shape[-1])
            flat = torch.cat([flat, flat.new_zeros(need - rows, flat.shape[1])])
            return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose per-row result does not depend on how many rows are computed together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias)


def _one_plus_scale(chunks: int, scale_chunks: tuple[int, ...], dim: int) -> torch.Tensor:
    """(chunks * dim,): 1 over the `scale` chunks, 0 elsewhere; adding it turns scale into (1 + scale),
    so that adaLN's x * (1 + scale) + shift (DiT, sec. 3.2) is one fused multiply-add per layer."""
    v = torch.zeros(chunks, dim)
    v[list(scale_chunks)] = 1.0
    return v.reshape(-1)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, N, D) with N = (H/P)(W/P): a stride-P convolution, computed as a
    linear map on `patchify`'s (P, P, C) flattening (the same numbers, and batch-invariant)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (D, C, P, P) -> (D, P*P*C) in patchify's order
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        return invariant_linear(patchify(x, self.patch_size), w, self.proj.bias)  # (B, N, P*P*C) -> (B, N, D)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): half the channels encode rows, half columns.

    Returns (grid_h * grid_w, dim), row-major over the patch grid, float64.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    # DiT's reference code embeds the column index with the first half: keep that ordering.
    return np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): sinusoidal features (as in the Transformer / DDPM) then an MLP.

    Frequencies max_period^(-i / (half - freq_shift)), i < half = freq_dim / 2: freq_shift 0 is
    facebookresearch/DiT's, 1 diffusers' DiT's (`Timesteps(downscale_freq_shift=1)`); the features are
    [cos, sin] in both."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0):
        super().__init__()
        self.freq_dim = freq_dim
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (B, freq_dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row `num_classes` is the null class used by classifier-free guidance.

    Label dropout is the objective's job (it swaps labels for the null id), so this layer has no
    randomness and the null id is simply `num_classes`.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class RMSNorm(nn.Module):
    """x / rms(x) over the last dimension (Zhang & Sennrich 2019), computed in fp32 and returned in x's
    dtype; `affine` adds a learned gain (QK-norm's). LayerNorm without the mean: inside adaLN the shift
    and scale come from the condition, so a block needs no gain of its own."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int) -> nn.Module:
    """The per-token normalisation that adaLN modulates: LayerNorm (DiT) or RMSNorm (LightningDiT), no gain."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm={kind!r}: allowed {', '.join(NORMS)}")


# RoPE's base: with a grid of a few patches a side (7 for 28x28 images and patch 4) the usual 10,000 leaves
# most frequencies all but constant across the image; 100 spreads them from one turn per ~6 patches to ~1/50.
ROPE_THETA = 100.0


def rope_2d(head_dim: int, grid: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary position tables (Su et al. 2021; Heo et al. 2024 for images): (cos, sin), each
    (grid * grid, head_dim), tokens row-major. The first half of a head's channels turns with the token's
    row, the second with its column; within each half, channel i pairs with i + head_dim / 4."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    f = head_dim // 4
    freqs = theta ** (-torch.arange(f, dtype=torch.float64) / f)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    ang = torch.stack([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, axis, f)
    ang = ang.unsqueeze(2).expand(-1, 2, 2, f).reshape(grid * grid, head_dim)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (..., N, head_dim) by its token's angles (`rope_2d`'s layout)."""
    xs = x.unflatten(-1, (2, 2, -1))  # (..., axis, pair half, frequency)
    rot = torch.stack((-xs[..., 1, :], xs[..., 0, :]), dim=-2).flatten(-3)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def bf16_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for bf16 q, k, v (B, H, N, Dh) on the CPU, written out: the two products in
    bf16 (fp32 accumulation, bf16 results), the softmax in fp32, its probabilities rounded to bf16 for the
    second product. PyTorch's CPU flash attention runs bf16 several times slower than fp32 (its backward
    ~14 against ~2.3 ms a call at DiT-T/4's shape, batch 64), and fp32 flash is itself slow on 49-token
    sequences: this takes ~1.7 against fp32 SDPA's ~3.3 ms forward and backward (Zen 5;
    `benchmarks/probes/attention_cpu.py`), and a compiled bf16 training step of DiT-T/4 ~20% less time."""
    probs = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1).to(q.dtype)
    return probs @ v


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (in bf16 on the CPU through
    `bf16_attention_cpu`); optionally with QK-norm (RMSNorm with a learned gain on each head's queries
    and keys, as in LightningDiT and SD3) and rotary position angles passed in by the network (`rope`,
    from `rope_2d`).

    Setting `self.capture = []` (opt-in, see `ditkit.viz.attention`) makes the layer also compute the
    attention probabilities explicitly and append them, (B, H, N, N), to that list; the normal path
    pays one attribute check.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim, affine=True) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, affine=True) if qk_norm else None
        self.capture: Optional[list] = None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        dtype = q.dtype
        scale = self.head_dim ** -0.5
        # bf16 on the CPU (autocast in training, a bf16 inference copy): `bf16_attention_cpu`, not SDPA
        cpu_bf16 = dtype == torch.bfloat16 and q.device.type == "cpu"
        with torch.autocast("cpu", enabled=False) if cpu_bf16 else contextlib.nullcontext():
            if self.q_norm is not None or rope is not None:
                q, k = q.float(), k.float()  # the norms and rotations in fp32
                if self.q_norm is not None:
                    q, k = self.q_norm(q), self.k_norm(k)
                if rope is not None:
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                q, k = q.to(v.dtype), k.to(v.dtype)
            if self.capture is not None:
                probs = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * scale, dim=-1)
                self.capture.append(probs.detach())
            if cpu_bf16:
                out = bf16_attention_cpu(q, k, v, scale)  # (B, H, N, Dh)
            else:
                out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. The DiT reference uses the tanh approximation of GELU; on CPU PyTorch's
    tanh kernel is ~8x slower than the exact (erf) one (measured: 25.8 vs 3.3 ms forward + backward for
    DiT-T/4's MLP at batch 128, 13% of a training step), so the exact GELU is the default."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "none"):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.gelu_approximate = gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximate))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU's hidden width: 2/3 of the GELU MLP's (three matrices instead of two: the same parameters
    and FLOPs), rounded up to a multiple of 8."""
    return 8 * math.ceil(2 * int(dim * mlp_ratio) / 3 / 8)


class SwiGLU(nn.Module):
    """fc2(SiLU(x W_gate) * (x W_value)) (Shazeer 2020, "GLU Variants Improve Transformer"), as in LLaMA and
    LightningDiT; the gate and value maps are one product of twice the hidden width."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, 2 * hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        # SiLU written as gate * sigmoid(gate) through exp: PyTorch's CPU SiLU (and sigmoid) kernel takes a
        # scalar path for the tail of each thread's share, whose last bits differ from its vector path, and
        # at this width (344, not a multiple of 16) where the shares split depends on the batch, so an
        # image's bits did; exp's kernel is the same on every element (tests/test_model.py, "one seed,
        # one image"). The clamp keeps exp finite (for gate < -80 the factor is below 1e-34 either way).
        return self.fc2(gate / (1 + torch.exp(-gate.clamp(min=-80.0))) * value)


MLPS = ("gelu", "swiglu")


class AdaLNZeroBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, fig. 3).

    The condition c (B, D) yields six vectors: shift/scale/gate for attention and for the MLP. The
    modulation layer is zero-initialised, so every gate is 0 and a fresh block is the identity.
    `norm`, `qk_norm` and `mlp` choose LightningDiT's parts (RMSNorm, QK-norm, SwiGLU; Yao et al. 2025)
    instead of DiT's (LayerNorm, none, GELU).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, gelu_approximate: str = "none", *,
                 norm: str = "layernorm", qk_norm: bool = False, mlp: str = "gelu"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = make_norm(norm, dim)
        if mlp == "gelu":
            self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate)
        elif mlp == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        else:
            raise ValueError(f"mlp={mlp!r}: allowed {', '.join(MLPS)}")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        self.register_buffer("_one_plus", _one_plus_scale(6, (1, 4), dim), persistent=False)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 6D): [shift_a, 1 + scale_a, gate_a, shift_m, 1 + scale_m, gate_m]."""
        return self.adaLN_modulation(c) + self._one_plus

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None, *, mod: Optional[torch.Tensor] = None,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x (B, N, D); either the condition c (B, D) or its `modulation(c)` (B, 6D), which a sampler can
        memoise; `rope`: the network's rotary tables, if it uses them."""
        if mod is None:
            mod = self.modulation(c)
        shift_a, scale1_a, gate_a, shift_m, scale1_m, gate_m = (v.unsqueeze(1) for v in mod.chunk(6, dim=1))
        x = torch.addcmul(x, gate_a, self.attn(torch.addcmul(shift_a, self.norm1(x), scale1_a), rope))
        x = torch.addcmul(x, gate_m, self.mlp(torch.addcmul(shift_m, self.norm2(x), scale1_m)))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to P*P*C_out per token; zero-initialised so a fresh net outputs 0."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("_one_plus", _one_plus_scale(2, (1,), dim), persistent=False)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, D) -> (B, 2D): [shift, 1 + scale]."""
        return self.adaLN_modulation(c) + self._one_plus

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None, *, mod: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, D); either the condition c (B, D) or its `modulation(c)` (B, 2D)."""
        if mod is None:
            mod = self.modulation(c)
        shift, scale1 = (v.unsqueeze(1) for v in mod.chunk(2, dim=1))
        return self.linear(torch.addcmul(shift, self.norm(x), scale1))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches row-major, each flattened as (P, P, C)."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, P*P*C) -> (B, C, H, W)."""
    B = x.shape[0]
    gh, gw = height // p, width // p
    x = x.reshape(B, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)
