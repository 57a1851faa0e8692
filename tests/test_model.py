"""The DiT network: patchify, adaLN-Zero, the null class, presets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.models import PRESETS, DiTConfig, build_model, model_config
from ditkit.models.layers import (AdaLNZeroBlock, Attention, bf16_attention_cpu, patchify, rope_2d,
                                  sincos_pos_embed_2d, unpatchify)


@pytest.mark.parametrize("c,h,p", [(1, 28, 4), (3, 32, 2), (1, 28, 7), (3, 16, 4)])
def test_patchify_unpatchify_inverse(c, h, p):
    x = torch.randn(2, c, h, h)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (h // p) ** 2, p * p * c)
    assert torch.equal(unpatchify(tokens, p, c, h, h), x)
    # token 1 is the second patch of the first row
    assert torch.equal(tokens[0, 1].view(p, p, c).permute(2, 0, 1), x[0, :, :p, p:2 * p])


def test_patchify_matches_patch_embedding_conv():
    """The model's stride-P conv equals a linear map on patchify's (P, P, C) flattening."""
    net = build_model(model_config("DiT-T/4", in_channels=3, input_size=16))
    x = torch.randn(2, 3, 16, 16)
    w = net.x_embedder.proj.weight  # (D, C, P, P)
    lin = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (D, P*P*C)
    ref = patchify(x, 4) @ lin.T + net.x_embedder.proj.bias
    torch.testing.assert_close(net.x_embedder(x), ref, atol=1e-5, rtol=1e-5)


def test_fresh_blocks_are_identity_and_output_is_zero():
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4"))
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4) * 1000
    cond = Condition.from_labels(torch.tensor([0, 3, 9, 10]), 10)
    tokens = torch.randn(4, net.num_tokens, 128)
    c = net.embed_condition(t, cond)
    for block in net.blocks:
        assert isinstance(block, AdaLNZeroBlock)
        assert torch.equal(block(tokens, c), tokens)
    assert torch.count_nonzero(net(x, t, cond)) == 0


def test_zero_init_gates_open_after_a_step():
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4"))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4) * 1000
    cond = Condition.from_labels(torch.tensor([1, 2, 3, 4]), 10)
    (net(x, t, cond) - x).pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(net(x, t, cond)) > 0


def test_hidden_at_returns_the_tokens_after_that_block_and_the_same_output():
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4"))
    for p in net.parameters():  # open the zero-initialised gates, so that every block does something
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3) * 1000
    cond = Condition.from_labels(torch.tensor([0, 5, 10]), 10)
    c = net.embed_condition(t, cond)
    tokens, after = net.x_embedder(x) + net.pos_embed, []
    for block in net.blocks:
        tokens = block(tokens, c)
        after.append(tokens)
    want = net(x, t, cond)
    for k in (1, 2, 4):
        out, hidden = net(x, t, cond, hidden_at=k)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(hidden, after[k - 1], rtol=1e-6, atol=1e-6)
    for k in (0, 5):
        with pytest.raises(UsageError, match=f"hidden_at {k}: this DiT has blocks 1 to 4"):
            net(x, t, cond, hidden_at=k)


def test_null_class_id_comes_from_config():
    for k in (10, 7):
        net = build_model(model_config("DiT-T/4", num_classes=k))
        assert net.null_label == k
        assert net.y_embedder.table.num_embeddings == k + 1
        cond = Condition.from_labels(torch.tensor([0, k - 1]), k)
        assert cond.null().labels.tolist() == [k, k]
    # a null label is a real, trainable embedding distinct from the classes
    net = build_model(model_config("DiT-T/4", num_classes=10))
    emb = net.y_embedder(torch.arange(11))
    assert emb.shape == (11, 128) and not torch.allclose(emb[10], emb[0])


def test_class_model_needs_labels_and_unconditional_model_ignores_them():
    net = build_model(model_config("DiT-T/4"))
    with pytest.raises(ValueError, match="class-conditional"):
        net(torch.randn(1, 1, 28, 28), torch.ones(1), Condition.none(1))
    unc = build_model(model_config("DiT-T/4", num_classes=0))
    assert unc.y_embedder is None and unc.null_label is None
    assert unc(torch.randn(2, 1, 28, 28), torch.ones(2), Condition.none(2)).shape == (2, 1, 28, 28)


def test_sincos_position_embedding():
    pe = sincos_pos_embed_2d(16, 3, 3)
    assert pe.shape == (9, 16)
    # first quarter: sin of the column index at frequency 1 -> row-major grid order
    np.testing.assert_allclose(pe[:3, 0], np.sin([0, 1, 2]))
    np.testing.assert_allclose(pe[::3, 8], np.sin([0, 1, 2]))
    net = build_model(model_config("DiT-T/4", pos_embed="learned"))
    assert isinstance(net.pos_embed, torch.nn.Parameter)


@pytest.mark.parametrize("name,depth,width,heads,patch", [
    ("DiT-T/4", 4, 128, 4, 4), ("DiT-S/2", 12, 384, 6, 2), ("DiT-B/2", 12, 768, 12, 2),
    ("DiT-L/2", 24, 1024, 16, 2), ("DiT-XL/2", 28, 1152, 16, 2)])
def test_presets(name, depth, width, heads, patch):
    cfg = model_config(name, input_size=32)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, patch)


def test_paper_parameter_counts():
    # DiT-S/2 and DiT-XL/2 at 256px (latent 32x32x4, 1000 classes): 33M and 675M parameters (paper, table 1)
    for name, expected in (("DiT-S/2", 33e6), ("DiT-XL/2", 675e6)):
        cfg = model_config(name, input_size=32, in_channels=3, num_classes=1000)
        with torch.device("meta"):
            net = build_model(cfg)
        n = sum(p.numel() for p in net.parameters())
        assert abs(n - expected) / expected < 0.02, (name, n)
    assert set(PRESETS) >= {"DiT-T/4", "DiT-T/7", "DiT-T/2", "DiT-S/4", "DiT-B/4"}


def test_bad_model_configs_are_refused():
    with pytest.raises(UsageError, match="allowed"):
        model_config("DiT-Q/3")
    with pytest.raises(UsageError, match="multiple of the patch size"):
        model_config("DiT-T/4", input_size=30)
    with pytest.raises(UsageError, match="in_channels"):
        model_config("DiT-T/4", in_channels=2)
    with pytest.raises(UsageError, match="unknown DiT config"):
        DiTConfig.from_dict({"depth": 2, "bogus": 1})


def _trained_like_net(seed: int = 0):
    """A DiT-T/4 whose zero-initialised adaLN layers are randomised, so the condition path matters."""
    torch.manual_seed(seed)
    net = build_model(model_config("DiT-T/4")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_modulation_cache_changes_nothing_and_is_reused():
    net = _trained_like_net()
    x, t = torch.randn(6, 1, 28, 28), torch.tensor([500.0, 500.0, 500.0, 250.0, 250.0, 500.0])
    cond = Condition.from_labels(torch.tensor([3, 10, 3, 7, 10, 3]), 10)
    cache = net.modulation_cache
    with torch.no_grad():
        net.modulation_cache = None
        ref = net(x, t, cond)
        net.modulation_cache = cache
        first = net(x, t, cond)
        again = net(x, t, cond)
        alone = net(x[3:4], t[3:4], cond.index(torch.tensor([3])))
    assert torch.equal(first, ref) and torch.equal(again, ref)
    assert torch.equal(alone, ref[3:4])  # one image alone, from the memo: the same bits
    assert cache.misses == 4 and len(cache) == 4  # (500,3) (500,10) (250,7) (250,10)
    assert cache.hits == 4 + 1
    net.train()  # a no-grad forward in training (model guidance) has fresh times at every step: no memo
    with torch.no_grad():
        assert torch.equal(net(x, t + 1, cond), net.eval()(x, t + 1, cond))
    assert cache.misses == 4 + 4  # only the eval-mode call filled it


def test_modulation_cache_follows_weight_updates_and_stays_bounded():
    net = _trained_like_net()
    x, t = torch.randn(2, 1, 28, 28), torch.full((2,), 100.0)
    cond = Condition.from_labels(torch.tensor([1, 10]), 10)
    with torch.no_grad():
        before = net(x, t, cond)
    # an optimiser step on the condition path must invalidate the memo
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    net(x, t, cond).square().mean().backward()  # grad enabled: the memo is not used
    opt.step()
    net.eval()
    with torch.no_grad():
        after = net(x, t, cond)
        cache, net.modulation_cache = net.modulation_cache, None
        fresh = net(x, t, cond)
        net.modulation_cache = cache
        # load_state_dict back to other weights: invalidated again
        other = _trained_like_net(seed=1)
        net.load_state_dict(other.state_dict())
        assert torch.equal(net(x, t, cond), other(x, t, cond))
    assert not torch.equal(after, before) and torch.equal(after, fresh)
    from ditkit.models.dit import ModulationCache
    small = ModulationCache(max_entries=3)
    net.modulation_cache = small
    with torch.no_grad():
        for step in range(5):
            net(x, torch.full((2,), float(step)), cond)
    assert len(small) == 3


@pytest.mark.parametrize("k,n,dtype", [(512, 128, torch.float32), (128, 512, torch.float32),
                                         (1536, 384, torch.float32), (384, 1536, torch.float32),
                                         (512, 128, torch.bfloat16), (128, 384, torch.bfloat16)])
def test_linear_rows_do_not_depend_on_how_many_rows_are_computed(k, n, dtype):
    """The CPU GEMM changes a row's last bits with the row count (split reductions for few rows); the
    padded Linear must not. K = 1536 (DiT-S's MLP) differs for up to ~186 rows here without padding; in
    bf16, K = 512 differs below 128 rows (a probe of one draw saw no difference and kept 64)."""
    from ditkit.models.layers import Linear

    torch.manual_seed(0)
    lin = Linear(k, n)
    if dtype == torch.bfloat16:  # bf16 shows a changed summation order rarely: more draws, small biases
        lin.weight.data.normal_(0, k ** -0.5)
        lin.bias.data.normal_(0, 0.02)
    lin.to(dtype)
    for draw in range(6 if dtype == torch.bfloat16 else 1):
        x = torch.randn(3000, k).to(dtype)
        with torch.no_grad():
            ref = lin(x)
            for m in (1, 2, 5, 49, 64, 98, 127, 150, 186, 250, 400, 1100):
                assert torch.equal(lin(x[:m]), ref[:m]), (draw, m)


def test_dit_s_image_does_not_depend_on_its_batch():
    """One seed, one image on a wider preset too (DiT-S/4: width 384, MLP 1536), at inference."""
    torch.manual_seed(0)
    net = build_model(model_config("DiT-S/4")).eval()
    for p in net.parameters():  # a trained-looking net: adaLN-Zero gates open
        p.data.normal_(0, 0.05)
    x = torch.randn(6, 1, 28, 28)
    t = torch.rand(6)
    cond = Condition.from_labels(torch.tensor([0, 1, 2, 3, 4, 5]), 10)
    with torch.no_grad():
        full = net(x, t, cond)
        for idx in ([0], [0, 1], [3, 4, 5]):
            i = torch.tensor(idx)
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), idx


def test_bf16_dit_t_image_does_not_depend_on_its_batch():
    """A bf16 inference copy takes and returns fp32 (the sampler's state) and keeps "one seed, one image"
    (one image alone, three at a time, forty together: the same bits)."""
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4")).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    net.to(torch.bfloat16)
    x = torch.randn(40, 1, 28, 28)
    t = torch.rand(40)
    cond = Condition.from_labels(torch.arange(40) % 10, 10)
    with torch.no_grad():
        full = net(x, t, cond)
        assert full.dtype == torch.float32  # the sampler's dtype in and out
        for lo in range(0, 40, 3):
            i = torch.arange(lo, min(lo + 3, 40))
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), lo
        for k in range(0, 40, 5):  # every fifth alone (each pays a padded batch in bf16: slow without bf16 units)
            i = torch.tensor([k])
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), k


def test_bf16_attention_cpu_is_sdpa_within_bf16_rounding():
    """The written-out bf16 attention (ditkit's attention in bf16 on the CPU) against fp32 SDPA of the same
    bf16 inputs, forward and backward, on peaked attention, where a wrong scale or softmax axis shows."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 49, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    q = (q * 4).requires_grad_()  # logits spread ~4: peaked rows
    k.requires_grad_(), v.requires_grad_()
    ref_in = [a.detach().float().requires_grad_() for a in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in)
    probs = torch.softmax(ref_in[0] @ ref_in[1].transpose(-2, -1) / 32 ** 0.5, -1)
    assert probs.max(-1).values.mean() > 0.5  # on average over half of a row on one token
    out = bf16_attention_cpu(q, k, v, 32 ** -0.5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() < 0.02 * ref.norm()
    grad = torch.randn(ref.shape, generator=g)
    ref.backward(grad)
    out.backward(grad.to(torch.bfloat16))
    for a, r in zip((q, k, v), ref_in):
        assert (a.grad.float() - r.grad).norm() < 0.05 * r.grad.norm()
    # a wrong scale or axis is far outside these bounds
    assert (bf16_attention_cpu(q, k, v, 1.0).float() - ref).norm() > 0.1 * ref.norm()


@pytest.mark.parametrize("parts", [{}, dict(qk_norm=True, rope=True)])
def test_attention_layer_in_bf16_on_the_cpu_is_its_fp32_self(parts):
    """The attention layer under bf16 autocast (training) and as a bf16 copy (inference): its fp32
    output and input gradient within bf16 rounding, with and without QK-norm and RoPE."""
    torch.manual_seed(0)
    attn = Attention(128, 4, qk_norm=parts.get("qk_norm", False))
    rope = rope_2d(32, 7) if parts.get("rope") else None
    x = torch.randn(5, 49, 128, requires_grad=True)
    ref = attn(x, rope)  # fp32: scaled_dot_product_attention
    ref.square().sum().backward()
    grad_ref, x.grad = x.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, rope)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).norm() < 0.03 * ref.norm()
    out.float().square().sum().backward()
    assert (x.grad - grad_ref).norm() < 0.05 * grad_ref.norm()
    with torch.no_grad():
        inf = attn.to(torch.bfloat16)(x.detach().to(torch.bfloat16), rope)
    assert inf.dtype == torch.bfloat16 and (inf.float() - ref).norm() < 0.03 * ref.norm()


LIGHTNING = dict(norm="rmsnorm", qk_norm=True, mlp="swiglu", rope=True)


def test_rmsnorm_and_swiglu_follow_their_definitions():
    from ditkit.models.layers import RMSNorm, SwiGLU, swiglu_hidden

    x = torch.randn(3, 5, 16)
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(RMSNorm(16)(x), want)
    norm = RMSNorm(16, affine=True)
    norm.weight.data.uniform_(0.5, 2)
    torch.testing.assert_close(norm(x), want * norm.weight)
    assert RMSNorm(16)(x.bfloat16()).dtype == torch.bfloat16
    # SwiGLU: the same parameters as the GELU MLP it replaces (within its rounding to 8)
    assert swiglu_hidden(128, 4.0) == 344 and swiglu_hidden(384, 4.0) == 1024
    mlp = SwiGLU(16, 24)
    gate, value = x @ mlp.fc1.weight[:24].T + mlp.fc1.bias[:24], x @ mlp.fc1.weight[24:].T + mlp.fc1.bias[24:]
    torch.testing.assert_close(mlp(x), (gate * torch.sigmoid(gate) * value) @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_rope_scores_depend_only_on_the_offset_between_tokens():
    """Rotary angles make a query-key score a function of their relative position on the grid (Su et al.
    2021), along each axis separately, and leave every vector's length unchanged."""
    from ditkit.models.layers import apply_rope, rope_2d

    grid, dh = 7, 32
    cos, sin = rope_2d(dh, grid)
    q, k = torch.randn(dh, dtype=torch.float64), torch.randn(dh, dtype=torch.float64)
    rq = apply_rope(q.expand(grid * grid, dh), cos.double(), sin.double())  # q at every position
    rk = apply_rope(k.expand(grid * grid, dh), cos.double(), sin.double())
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(grid * grid))
    score = (rq @ rk.T).view(grid, grid, grid, grid)  # [row_q, col_q, row_k, col_k]
    for dr, dc in ((0, 0), (1, 0), (0, 2), (-3, 1), (2, -2)):
        vals = [score[r, c, r + dr, c + dc] for r in range(grid) for c in range(grid)
                if 0 <= r + dr < grid and 0 <= c + dc < grid]
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals)), rtol=0, atol=1e-5)
    assert not torch.allclose(score[0, 0, 0, 1], score[0, 0, 1, 0])  # rows and columns turn different channels
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(30, grid)


def test_lightning_block_parts_build_and_keep_the_dit_contracts():
    """--norm rmsnorm --qk-norm --mlp swiglu --rope: adaLN-Zero (fresh blocks are the identity, the
    output 0), the same parameter count within 1%, and "one seed, one image" at inference."""
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4", **LIGHTNING))
    base = build_model(model_config("DiT-T/4"))
    n, n0 = (sum(p.numel() for p in m.parameters()) for m in (net, base))
    assert abs(n - n0) / n0 < 0.01 and n != n0
    x, t = torch.randn(6, 1, 28, 28), torch.rand(6)
    cond = Condition.from_labels(torch.tensor([0, 3, 9, 10, 1, 2]), 10)
    tokens = torch.randn(6, net.num_tokens, 128)
    c = net.embed_condition(t, cond)
    rope = (net.rope_cos, net.rope_sin)
    for block in net.blocks:
        assert torch.equal(block(tokens, c, rope=rope), tokens)
    assert torch.count_nonzero(net(x, t, cond)) == 0
    net.eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    with torch.no_grad():
        full = net(x, t, cond)
        assert full.abs().sum() > 0 and torch.isfinite(full).all()
        for idx in ([0], [1, 2], [3, 4, 5]):
            i = torch.tensor(idx)
            assert torch.equal(net(x[i], t[i], cond.index(i)), full[i]), idx
    # each part changes the function (no part silently ignored)
    for part, value in LIGHTNING.items():
        torch.manual_seed(0)
        other = build_model(model_config("DiT-T/4", **{**LIGHTNING, part: DiTConfig.__dataclass_fields__[part].default}))
        shared = {k: v for k, v in net.state_dict().items() if k in other.state_dict()
                  and other.state_dict()[k].shape == v.shape}
        other.load_state_dict(shared, strict=False)
        with torch.no_grad():
            assert not torch.allclose(other.eval()(x, t, cond), full), part


def test_lightning_parts_bad_values_are_refused():
    with pytest.raises(UsageError, match="norm='batchnorm': allowed layernorm, rmsnorm"):
        model_config("DiT-T/4", norm="batchnorm")
    with pytest.raises(UsageError, match="mlp='relu': allowed gelu, swiglu"):
        model_config("DiT-T/4", mlp="relu")
    with pytest.raises(UsageError, match="divisible by 4"):
        model_config("DiT-T/4", rope=True, hidden_size=120, num_heads=4)  # head width 30
