"""INT8 inference (ditkit.quantize): which layers are swapped, how close INT8 stays to fp32, the fallback
where the kernels are missing, and the clear errors where INT8 cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.models import build_model, model_config
from ditkit.quantize import apply_quantize, check_quantize, quantize_int8, state_bytes, token_linears


def random_net(depth: int = 2, **kw) -> nn.Module:
    """A DiT-T/4 of `depth` blocks with every weight drawn (a fresh DiT's adaLN-Zero blocks do nothing)."""
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4", depth=depth, **kw))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return net.eval().requires_grad_(False)


def inputs(batch: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.rand(batch, generator=g)
    return x, t, Condition.from_labels(torch.arange(batch) % 10, 10)


def test_swaps_the_token_maps_and_keeps_the_condition_path_in_fp32():
    net = random_net(depth=2)
    names = token_linears(net)
    # per block: attention's qkv and output maps, the MLP's two; then the output layer
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] \
        + ["final_layer.linear"]
    assert quantize_int8(net) == 9
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    assert isinstance(net.blocks[1].mlp.fc2, DynamicQuantLinear)
    assert isinstance(net.blocks[0].adaLN_modulation[-1], nn.Linear)  # memoised per (t, class): stays fp32
    assert isinstance(net.t_embedder.mlp[0], nn.Linear)
    assert token_linears(net) == []


@pytest.mark.parametrize("kw", [{}, dict(mlp="swiglu", qk_norm=True, rope=True, norm="rmsnorm")])
def test_int8_output_is_close_to_fp32_and_smaller(kw):
    net = random_net(depth=2, **kw)
    x, t, cond = inputs()
    ref = net(x, t, cond)
    before = state_bytes(net)
    quantize_int8(net)
    out = net(x, t, cond)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # int8 changes the result, by a few percent at most
    assert state_bytes(net) < 0.75 * before
    # deterministic at a fixed batch
    assert torch.equal(net(x, t, cond), out)


def test_check_quantize_names_the_flag():
    assert check_quantize(None) == "none" and check_quantize("int8") == "int8"
    with pytest.raises(UsageError, match=r"--quantize 'int4': allowed none, int8"):
        check_quantize("int4")


def test_missing_kernels_fall_back_to_fp32_with_a_logged_note(monkeypatch, caplog):
    net = random_net(depth=1)
    monkeypatch.setattr("ditkit.quantize.supported_engines", lambda: ["none"])
    with caplog.at_level(logging.WARNING, logger="ditkit.quantize"):
        assert apply_quantize(net, "int8", torch.device("cpu")) == "none"
    assert "no quantised CPU engine" in caplog.text and "running in fp32" in caplog.text
    assert token_linears(net)  # untouched


def test_a_gpu_model_falls_back_to_fp32(caplog):
    net = random_net(depth=1)
    with caplog.at_level(logging.WARNING, logger="ditkit.quantize"):
        assert apply_quantize(net, "int8", torch.device("cuda")) == "none"
    assert "CPU only" in caplog.text


def test_models_where_int8_cannot_run_get_one_clear_error():
    with pytest.raises(UsageError, match="--precision fp32"):
        quantize_int8(random_net(depth=1).to(torch.bfloat16))
    with pytest.raises(UsageError, match="inference copy"):
        quantize_int8(random_net(depth=1).train())
    convs = nn.Sequential(nn.Conv2d(1, 4, 3)).eval().requires_grad_(False)
    with pytest.raises(UsageError, match="no linear maps"):
        quantize_int8(convs)


# ---- through load_model, the CLI and the server -------------------------------------------------
def test_load_model_int8_samples_close_to_fp32(tiny_run):
    from ditkit.runs import load_model
    from ditkit.sampling import sample_batch

    fp32 = load_model(tiny_run)
    int8 = load_model(tiny_run, quantize="int8")
    assert (fp32.quantize, int8.quantize) == ("none", "int8")
    assert token_linears(int8.net) == [] and token_linears(fp32.net)
    assert int8.guide is None or token_linears(int8.guide.net) == []
    a = sample_batch(fp32, [1, 2, 3, 4], [0, 1, 2, 3], steps=4)
    b = sample_batch(int8, [1, 2, 3, 4], [0, 1, 2, 3], steps=4)
    assert not torch.equal(a, b) and float((a - b).abs().mean()) < 0.05


def test_cli_quantize_flag_and_its_errors(tiny_run, tmp_path, capsys):
    from ditkit.cli import main as cli_main

    out = tmp_path / "s.npz"
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--num", "4", "--steps", "2",
                     "--quantize", "int8"]) == 0
    assert out.exists()
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--num", "4", "--steps", "2",
                     "--quantize", "int8", "--precision", "bf16"]) == 2
    assert "--quantize int8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--quantize", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_server_serves_int8_and_says_so(tiny_run):
    from ditkit.serve.app import ModelInfo, ServeSettings

    settings = ServeSettings(quantize="int8", max_batch_size=8)
    settings.validate()
    assert settings.resolved_precision() == "fp32"  # auto: INT8 quantises fp32 weights
    model = settings.load(tiny_run)
    info = ModelInfo.of(model, settings).as_json(settings)
    assert info["quantize"] == "int8" and info["precision"] == "fp32"
    with pytest.raises(UsageError, match="--quantize 'int4'"):
        ServeSettings(quantize="int4").validate()
