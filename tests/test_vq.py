"""The VQ tokenizer (ditkit.models.vq, ditkit.tokenizer): shapes, codebook bookkeeping, its run folder,
and the clear errors when a tokenizer run is given where a generator is expected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ditkit.errors import DitkitError, UsageError
from ditkit.models.vq import VQVAE, VQConfig
from ditkit.tokenizer import TokenizerTrainConfig, code_usage, train_tokenizer


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """A VQ-T/4 tokenizer trained for a few steps on 256 digits (seconds), with a 64-code book."""
    out = tmp_path_factory.mktemp("runs") / "vq"
    return train_tokenizer(TokenizerTrainConfig(out=str(out), codebook_size=64, max_steps=4, batch_size=32,
                                                subset=256, eval_images=0, progress=False, log_every=2))


def test_encode_decode_shapes_and_codes_match_the_quantizer():
    torch.manual_seed(0)
    net = VQVAE(VQConfig(codebook_size=32))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    net(x)  # a training pass: the codebook's k-means initialisation
    net.eval()
    codes = net.encode(x)
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    # encode's nearest code is the library quantizer's own choice (in eval mode it does not move the book)
    _, lib_codes, _ = net.quantizer(net.encoder(x))
    assert torch.equal(codes, lib_codes)
    assert net.decode(codes).shape == (3, 1, 28, 28)
    assert VQVAE(VQConfig(downsample=2, codebook_size=16)).eval().encode(x).shape == (3, 14, 14)


def test_config_refuses_bad_values_by_name():
    with pytest.raises(UsageError, match="downsample"):
        VQConfig(downsample=3).validate()
    with pytest.raises(UsageError, match="codebook_size"):
        VQConfig(codebook_size=1).validate()
    with pytest.raises(UsageError, match="unknown .* config field"):
        VQConfig.from_dict({"codebook_size": 8, "colour": 1})


def test_code_usage_measures_perplexity_and_dead_codes():
    uniform = code_usage(torch.arange(16).repeat(10), 16)
    assert uniform["perplexity"] == pytest.approx(16) and uniform["dead_codes"] == 0
    assert uniform["entropy_bits_per_code"] == pytest.approx(4.0)
    half = code_usage(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert half["perplexity"] == pytest.approx(4) and half["dead_codes"] == 4 and half["used_codes"] == 4
    one = code_usage(torch.zeros(50, dtype=torch.long), 8)
    assert one["perplexity"] == pytest.approx(1) and one["entropy_bits_per_code"] == pytest.approx(0, abs=1e-12)


def test_train_tokenizer_writes_a_vq_run_folder(vq_run):
    from ditkit.runs import latest_checkpoint, read_run_config

    cfg = read_run_config(vq_run, families=("vq",))
    assert cfg["family"] == "vq" and cfg["model"]["codebook_size"] == 64
    ck = latest_checkpoint(vq_run)
    assert ck is not None and (ck / "model.safetensors").exists()
    lines = (vq_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    assert all(math.isfinite(json.loads(line)["recon"]) for line in lines)
    # the tokenizer round-trips: its weights reload into the same codes
    from ditkit.objectives.masked import load_tokenizer
    tok = load_tokenizer(vq_run)
    x = torch.zeros(2, 1, 28, 28)
    assert tok.encode(x).shape == (2, 7, 7)


def test_a_tokenizer_run_is_refused_where_a_model_is_expected(vq_run):
    from ditkit.runs import load_model

    with pytest.raises(DitkitError, match="'vq' run"):
        load_model(vq_run, device="cpu")


def test_train_tokenizer_refuses_bad_input(tmp_path, vq_run):
    with pytest.raises(UsageError, match="--max-steps or --max-minutes"):
        train_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "a")))
    with pytest.raises(UsageError, match="'dit' preset"):
        train_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "b"), model="DiT-T/4", max_steps=1, subset=64,
                                             batch_size=8, eval_images=0, progress=False))
    with pytest.raises(DitkitError, match="already holds a run"):
        train_tokenizer(TokenizerTrainConfig(out=str(vq_run), max_steps=1, subset=64, batch_size=8,
                                             eval_images=0, progress=False))


def test_train_tokenizer_is_a_ditkit_command():
    from ditkit.cli import build_parser

    args = build_parser().parse_args(["train-tokenizer", "--out", "x", "--max-minutes", "5", "--codebook-size", "512"])
    assert (args.command, args.codebook_size, args.max_minutes) == ("train-tokenizer", 512, 5.0)
