"""`ditkit amused` on a tiny, randomly initialised AmusedPipeline built offline from diffusers' components
(UVit2DModel, VQModel, AmusedScheduler) and a tiny CLIP text model with a tokenizer made from a vocabulary
written here, saved to a folder and loaded back with local_files_only."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ditkit.amused import amused_generate, check_model_dir, load_amused, run
from ditkit.errors import DitkitError, UsageError


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    import torch
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("amused")
    # a byte-pair tokenizer with no merges: every word is spelled letter by letter, "</w>" ending its last one
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 2 + len(letters) + i for i, c in enumerate(letters)})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(vocab), hidden_size=8, intermediate_size=8,
        num_attention_heads=1, num_hidden_layers=2, projection_dim=8, max_position_embeddings=16))
    # 8 codes (+ the mask id 31 in a vocabulary of 32), a 4x4 token grid, a VQ-GAN of one stage (no downsampling)
    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
        encoder_hidden_size=8, vocab_size=32, codebook_size=8, in_channels=8, block_out_channels=8, num_res_blocks=1,
        downsample=True, upsample=True, block_num_heads=1, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=8, sample_size=4)
    vqvae = VQModel(act_fn="silu", block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], in_channels=3,
                    latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=8, out_channels=3,
                    sample_size=8, up_block_types=["UpDecoderBlock2D"], mid_block_add_attention=False,
                    lookup_from_codebook=True)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=AmusedScheduler(mask_token_id=31))
        pipe.save_pretrained(root / "pipe")
    finally:
        dlogging.set_verbosity(verbosity)
    return root / "pipe"


def test_a_saved_pipeline_loads_offline_and_draws(pipeline_dir, tmp_path):
    pipe = load_amused(pipeline_dir)
    a = amused_generate(pipe, ["a cat", "a dog"], steps=3, seed=7)
    b = amused_generate(pipe, ["a dog"], steps=3, seed=7)
    assert [im.size for im in a] == [(4, 4), (4, 4)]
    c = amused_generate(pipe, ["a cat", "a dog"], steps=3, seed=7)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))  # same seed, same images
    assert b[0].size == (4, 4)
    out = tmp_path / "x.png"
    args = argparse.Namespace(model_dir=str(pipeline_dir), prompt=["a cat", "a dog"], steps=2, cfg_scale=3.0,
                              size=None, seed=0, device="cpu", out=str(out))
    assert run(args) == 0
    from PIL import Image
    assert Image.open(out).size == (8, 4)


def test_missing_or_incomplete_folders_name_what_is_missing(pipeline_dir, tmp_path):
    with pytest.raises(DitkitError, match="no such folder"):
        check_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DitkitError, match="model_index.json is missing"):
        check_model_dir(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(DitkitError, match=r"transformer \(no transformer/diffusion_pytorch_model.safetensors.*"
                                          r"scheduler \(no scheduler/ folder\)"):
        load_amused(broken)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(pipeline_dir, other)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(DitkitError, match="not an AmusedPipeline"):
        check_model_dir(other)


def test_bad_settings_are_refused(pipeline_dir):
    pipe = load_amused(pipeline_dir)
    with pytest.raises(UsageError, match="--steps 0"):
        amused_generate(pipe, ["a cat"], steps=0)
    with pytest.raises(UsageError, match="--prompt"):
        amused_generate(pipe, [" "], steps=2)


def test_amused_is_a_ditkit_command():
    from ditkit.cli import build_parser

    args = build_parser().parse_args(["amused", "--model-dir", "d", "--prompt", "a cat", "--steps", "12"])
    assert (args.command, args.prompt, args.steps) == ("amused", ["a cat"], 12)


def test_the_pipeline_is_a_ditkit_text_model_whose_images_do_not_depend_on_their_batch(pipeline_dir):
    import torch

    from ditkit.amused import load_amused_model
    from ditkit.sampling import sample_batch
    from ditkit.settings import SamplingSettings, SettingsError

    model = load_amused_model(pipeline_dir)
    assert (model.num_classes, model.image_shape, model.family) == (0, (3, 4, 4), "amused")
    st = SamplingSettings(sampler="maskgit", steps=2, cfg_scale=3.0).validate(model)
    x = sample_batch(model, [-1, -1], [5, 6], st, prompts=["a cat", "a dog"])
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32 and -1 <= float(x.min()) <= float(x.max()) <= 1
    alone = sample_batch(model, [-1], [6], st, prompts=["a dog"])
    assert torch.equal(x[1:], alone)  # one seed, one image, whatever its neighbours
    assert model.text_encoder.inspect(["a cat", "abc " * 20]) == [{"tokens": 6, "truncated": False},
                                                                   {"tokens": 16, "truncated": True}]
    for bad, field in ((dict(cfg_scale=0.5), "cfg_scale"), (dict(sampler="euler"), "sampler"),
                       (dict(autoguidance=2.0), "autoguidance")):
        with pytest.raises(SettingsError) as e:
            st.replace(**bad).validate(model)
        assert e.value.field == field


def test_serve_hosts_the_pipeline_as_a_text_model(pipeline_dir):
    import time

    from fastapi.testclient import TestClient

    from ditkit.amused import load_amused_model
    from ditkit.serve.app import ServeSettings, create_app

    model = load_amused_model(pipeline_dir)
    with TestClient(create_app(model=model, settings=ServeSettings(rate_limit=0.0))) as c:
        end = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        info = c.get("/v1/model").json()
        assert info["text"] is True and info["guidance"] is True and info["num_classes"] == 0
        assert (info["samplers"], info["default_sampler"], info["default_steps"]) == (["maskgit"], "maskgit", 12)
        assert info["image_shape"] == [3, 4, 4] and info["model"] == "aMUSEd-4"
        req = {"prompt": "a cat", "num_samples": 2, "steps": 2, "seed": 1, "format": "json"}
        ok = c.post("/v1/generate", json=req)
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert len(body["images"]) == 2 and body["labels"] == [-1, -1] and body["sampler"] == "maskgit"
        assert body["guidance_scale"] == 10.0 and body["prompt_truncated"] is False
        assert c.post("/v1/generate", json=req).json()["images"] == body["images"]  # same seed, same images
        long = c.post("/v1/generate", json={"prompt": "abc " * 20, "steps": 2})
        assert long.status_code == 200 and long.headers["X-Prompt-Truncated"] == "true"
        for bad, field in (({"prompt": "   "}, "prompt"), ({}, "prompt"), ({"labels": [0]}, "labels"),
                           ({"prompt": "a cat", "guidance_scale": 0.5}, "guidance_scale")):
            r = c.post("/v1/generate", json={**bad, "steps": 2})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text


def test_serve_amused_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    from ditkit.cli import main

    assert main(["serve", "--amused", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ditkit serve: error: --amused ") and "no such folder" in err
    assert "\n" not in err and "Traceback" not in err
    assert main(["serve", "--amused", str(tmp_path), "--quantize", "int8"]) == 2
    assert "--quantize apply to a ditkit checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--amused", str(tmp_path), "--ckpt", str(tmp_path)])
