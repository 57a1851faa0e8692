"""MM-DiT: the two-stream joint-attention network keeps DiT's contract and reads its text condition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditkit.condition import Condition, TextNull
from ditkit.errors import UsageError
from ditkit.models.mmdit import MMDiT, MMDiTConfig, joint_attention, model_config

D_TXT = 384


def tiny(**kw) -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(MMDiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=7, **kw))


def text_cond(B: int = 3, L: int = 8, real=(5, 3, 8), seed: int = 1) -> Condition:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, D_TXT, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(real[:B])[:, None]
    tokens = tokens * mask[..., None]
    null = TextNull(torch.randn(2, D_TXT, generator=g), torch.ones(2, dtype=torch.bool), torch.randn(D_TXT, generator=g))
    return Condition.from_text(tokens, mask, torch.randn(B, D_TXT, generator=g), null)


def perturb(net: MMDiT, std: float = 0.05) -> MMDiT:
    """Open the zero-initialised gates and output (as training would)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def test_fresh_network_outputs_zero_and_has_the_shape_of_x():
    net = tiny()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = net(x, torch.rand(3), text_cond())
    assert out.shape == x.shape and float(out.abs().max()) == 0.0  # adaLN-Zero and a zero output layer


def test_text_padding_is_masked_out_of_the_joint_attention():
    net = perturb(tiny()).eval()
    x, t, cond = torch.randn(3, 1, 28, 28), torch.rand(3), text_cond()
    ref = net(x, t, cond)
    # whatever the padding holds, and however much of it there is, the image does not change
    junk = cond.tokens + torch.randn_like(cond.tokens) * (~cond.mask)[..., None]
    longer = torch.cat([cond.tokens, torch.randn(3, 4, D_TXT)], 1)
    longer_mask = torch.cat([cond.mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    for tokens, mask in ((junk, cond.mask), (longer, longer_mask)):
        other = Condition.from_text(tokens, mask, cond.pooled, cond.text_null)
        torch.testing.assert_close(net(x, t, other), ref, atol=1e-5, rtol=1e-5)
    # but the real tokens, and the pooled vector, do change it
    for other in (Condition.from_text(cond.tokens * 1.5, cond.mask, cond.pooled, cond.text_null),
                  Condition.from_text(cond.tokens, cond.mask, cond.pooled.flip(1), cond.text_null)):
        assert float((net(x, t, other) - ref).abs().max()) > 1e-4


def test_joint_attention_is_sdpa_with_a_key_mask_and_bf16_is_close():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 2:4] = False
    cap: list = []
    out = joint_attention(q, k, v, key_mask, cap)
    bias = torch.zeros(2, 1, 1, 9).masked_fill(~key_mask[:, None, None], -torch.inf)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5 + bias, -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert float(cap[0][0, :, :, 2:4].abs().max()) == 0.0 and torch.allclose(cap[0].sum(-1), torch.ones(2, 3, 9))
    low = joint_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_each_modality_has_its_own_weights_and_the_last_block_is_context_pre_only():
    net = tiny()
    b0, b1 = net.blocks
    for name in ("qkv", "q_norm", "k_norm", "proj", "mlp", "adaLN_modulation"):
        assert getattr(b0.text, name) is not getattr(b0.image, name)
    assert not hasattr(b1.text, "mlp") and not hasattr(b1.text, "proj") and hasattr(b1.image, "mlp")
    assert b1.text.adaLN_modulation[-1].out_features == 2 * 32  # shift, scale only
    assert net.context_embedder.in_features == D_TXT and net.context_embedder.out_features == 32


def test_an_image_does_not_depend_on_its_batch():
    net = perturb(tiny()).eval()
    cond = text_cond()
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    with torch.no_grad():
        full = net(x, t, cond)
        for i in range(3):
            one = net(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1)))
            assert torch.equal(one, full[i:i + 1])


def test_guidance_null_is_the_empty_prompt_and_training_reaches_the_text_stream():
    net = perturb(tiny())
    cond = text_cond()
    null = cond.null()
    assert torch.equal(null.tokens[:, :2], cond.text_null.tokens.expand(3, -1, -1))
    assert null.mask.sum(1).tolist() == [2, 2, 2]
    x = torch.randn(3, 1, 28, 28)
    both = Condition.cat(cond, null)
    out = net(torch.cat([x, x]), torch.full((6,), 0.5), both)
    assert out.shape == (6, 1, 28, 28) and float((out[:3] - out[3:]).abs().max()) > 1e-4
    loss = F.mse_loss(net(x, torch.rand(3), cond), x)
    loss.backward()
    for p in (net.context_embedder.weight, net.pooled_embedder[0].weight, net.blocks[0].text.qkv.weight,
              net.blocks[0].text.mlp.fc1.weight, net.blocks[1].text.qkv.weight):
        assert p.grad is not None and float(p.grad.abs().max()) > 0


def test_hidden_at_and_bf16_autocast():
    net = perturb(tiny())
    x, t, cond = torch.randn(3, 1, 28, 28), torch.rand(3), text_cond()
    out, hidden = net(x, t, cond, hidden_at=1)
    assert hidden.shape == (3, 16, 32) and torch.equal(out, net(x, t, cond))
    with pytest.raises(UsageError, match="hidden_at 3"):
        net(x, t, cond, hidden_at=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t, cond)
    torch.testing.assert_close(low.float(), out, atol=0.1, rtol=0.1)


def test_attention_maps_show_where_each_word_is_read():
    net = perturb(tiny()).eval()
    x, t, cond = torch.randn(3, 1, 28, 28), torch.rand(3), text_cond()
    maps = net.attention_maps(x, t, cond)
    assert maps.shape == (3, 2, 8, 4, 4)
    # per patch and block, the real words' shares sum to 1; padding words read nothing
    torch.testing.assert_close(maps.sum(2), torch.ones(3, 2, 4, 4), atol=1e-5, rtol=1e-5)
    assert float(maps[1, :, 3:].abs().max()) == 0.0
    assert all(b.capture is None for b in net.blocks)


def test_needs_a_text_condition_and_bad_configs_are_refused():
    net = tiny()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(UsageError, match="text model"):
        net(x, torch.rand(2), Condition.from_labels(torch.tensor([1, 2]), 10))
    with pytest.raises(UsageError, match="expected"):
        net(x, torch.rand(2), text_cond())  # 3 prompts for 2 images
    with pytest.raises(UsageError, match="num_classes=10"):
        MMDiTConfig(num_classes=10).validate()
    with pytest.raises(UsageError, match="divisible by num_heads"):
        MMDiTConfig(hidden_size=30, num_heads=4).validate()
    with pytest.raises(UsageError, match="unknown MM-DiT config field"):
        MMDiTConfig.from_dict({"depth": 2, "rope": True})
    with pytest.raises(UsageError, match="unknown model"):
        model_config("MMDiT-XL/9")


@pytest.mark.parametrize("name, depth, width, patch", [("MMDiT-T/4", 4, 128, 4), ("MMDiT-B/2", 12, 768, 2)])
def test_presets(name, depth, width, patch):
    c = model_config(name)
    assert (c.depth, c.hidden_size, c.patch_size, c.num_classes, c.text_dim) == (depth, width, patch, 0, D_TXT)
    assert MMDiTConfig.from_dict(c.to_dict()) == c


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """`ditkit train --model MMDiT-T/4 --captions mnist`, two steps of a narrow copy on 64 digits."""
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    return train(TrainConfig(out=str(tmp_path_factory.mktemp("t2i") / "run"), model="MMDiT-T/4", captions="mnist",
                             subset=64, batch_size=16, max_steps=2, depth=2, width=32, heads=2, progress=False,
                             sample_every=0, log_every=1, precision="fp32", compile=False))


def test_train_on_mnist_captions_then_sample_from_prompts(text_run):
    """The run records its text encoder, loads with it, and draws from prompts (guided against the empty
    prompt), an image independent of its batch; bad prompts are refused."""
    import json

    from ditkit.runs import load_model
    from ditkit.sampling import generate

    config = json.loads((text_run / "config.json").read_text())
    assert config["family"] == "mmdit" and config["text"]["encoder"] == "all-MiniLM-L6-v2"
    assert config["model"]["num_classes"] == 0 and config["data"]["captions"] == "mnist"
    assert config["objective"].get("stable_target", 0) == 0
    model = load_model(text_run)
    assert model.text_encoder is not None and model.text_encoder.max_tokens == config["text"]["max_tokens"]
    a = generate(model, num=3, prompts=["a bold, slanted seven", "two"], steps=2, cfg_scale=3.0, seed=5)
    b = generate(model, num=1, prompts=["a bold, slanted seven"], steps=2, cfg_scale=3.0, seed=5, batch_size=1)
    assert a["images"].shape == (3, 28, 28, 1) and np_equal(a["images"][0], b["images"][0])
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        generate(model, num=1, prompts=["  "], steps=2)
    with pytest.raises(UsageError, match="give --prompt"):
        generate(model, num=1, steps=2)


def test_server_takes_free_text_for_a_text_model_and_exports_the_prompt_cache(text_run):
    import time

    from fastapi.testclient import TestClient

    from ditkit.runs import load_model
    from ditkit.serve.app import ServeSettings, create_app

    model = load_model(text_run, device="cpu")
    with TestClient(create_app(model=model, settings=ServeSettings(rate_limit=0.0))) as c:
        end = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        ok = c.post("/v1/generate", json={"prompt": "a thin zero, slanted left", "num_samples": 2, "steps": 2,
                                          "format": "json", "seed": 3})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert len(body["images"]) == 2 and body["labels"] == [-1, -1] and body["prompt_truncated"] is False
        again = c.post("/v1/generate", json={"prompt": "a thin zero, slanted left", "num_samples": 2, "steps": 2,
                                             "format": "json", "seed": 3})
        assert again.json()["images"] == body["images"]
        info = c.get("/v1/model").json()
        assert info["text"] is True and info["guidance"] is True and info["max_guidance_scale"] > 1
        guided = c.post("/v1/generate", json={"prompt": "a bold seven", "steps": 2, "guidance_scale": 3.0,
                                              "format": "json", "seed": 3})
        assert guided.status_code == 200, guided.text
        page = c.get("/").text
        assert 'id="promptbox"' in page and '"text": true' in page
        long = c.post("/v1/generate", json={"prompt": "7 " * 45, "steps": 2})
        assert long.status_code == 200 and long.headers["X-Prompt-Truncated"] == "true"
        for bad, field in (({"prompt": "   "}, "prompt"), ({"labels": [3]}, "labels"), ({}, "prompt")):
            r = c.post("/v1/generate", json={**bad, "steps": 2})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text
        r = c.post("/v1/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
        assert r.status_code == 422
        metrics = c.get("/metrics").text
        hits = [line for line in metrics.splitlines() if line.startswith("ditkit_prompt_cache_hits")]
        misses = [line for line in metrics.splitlines() if line.startswith("ditkit_prompt_cache_misses")]
        assert hits and misses and float(hits[0].split()[-1]) >= 1


def test_text_runs_are_refused_with_class_models_and_class_runs_with_text_models(tmp_path):
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    with pytest.raises(UsageError, match="takes no text"):
        train(TrainConfig(out=str(tmp_path / "a"), model="DiT-T/4", captions="mnist", subset=32, max_steps=1))
    with pytest.raises(UsageError, match="trains on --captions"):
        train(TrainConfig(out=str(tmp_path / "b"), model="MMDiT-T/4", subset=32, max_steps=1))
    with pytest.raises(UsageError, match="--captions mnist: generated for the MNIST digits"):
        train(TrainConfig(out=str(tmp_path / "c"), model="MMDiT-T/4", captions="mnist", dataset=str(tmp_path),
                          image_size=8, max_steps=1))
    with pytest.raises(UsageError, match="--captions 'x.txt'"):
        TrainConfig(model="MMDiT-T/4", captions="x.txt", max_steps=1).validate()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def np_equal(a, b) -> bool:
    import numpy as np
    return bool(np.array_equal(a, b))


def test_prompt_adherence_reports_digits_fid_and_seed_matched_attribute_pairs(text_run):
    from ditkit.runs import load_model
    from ditkit.settings import SamplingSettings
    from ditkit.text.adherence import format_adherence, prompt_adherence

    model = load_model(text_run)
    res = prompt_adherence(model, SamplingSettings(steps=2, cfg_scale=2.0), per_prompt=1, digits=(7,))
    assert res["prompts"] == 4 * 2 * 4 + 4 * 2 and res["n"] == res["prompts"]
    assert 0 <= res["digit_accuracy"] <= 1 and res["fid_ratio"] > 0
    # per template and digit form: one thin/bold pair and one left/right pair, for each seed
    assert res["bold_more_ink_than_thin"]["pairs"] == 8 and res["right_slant_above_left"]["pairs"] == 8
    assert "digit accuracy" in format_adherence(res)
    from ditkit.runs import LoadedModel
    with pytest.raises(UsageError, match="takes class labels"):
        prompt_adherence(LoadedModel(model.net, model.objective, {}), per_prompt=1)


def test_word_attention_maps_each_word_of_the_prompt(text_run, tmp_path):
    from ditkit.runs import load_model
    from ditkit.viz.word_attention import plot_word_attention, word_attention, words_of

    model = load_model(text_run)
    assert words_of(model.text_encoder, "a bold, slanted seven") == [("a", [1]), ("bold", [2]), ("slanted", [4, 5]),
                                                                     ("seven", [6])]
    res = word_attention(model, "a bold, slanted seven", steps=2)
    assert res["words"] == ["a", "bold", "slanted", "seven"] and res["maps"].shape == (4, 2, 7, 7)
    assert res["image"].shape == (28, 28, 1)
    out = plot_word_attention([res], ["a bold, slanted seven"], tmp_path / "w.png")
    assert out.stat().st_size > 1000


def test_report_of_a_text_run_maps_each_word_to_the_patches_that_read_it(text_run, tmp_path):
    import shutil

    from ditkit.viz.report import WORD_ATTENTION_PROMPTS, ReportOptions, build_report

    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    rep = build_report(run, options=ReportOptions(num_per_ckpt=2, steps=2, tsne_points=20))
    assert "attention" in rep.figures and (run / "report_files" / "attention.png").stat().st_size > 0
    assert "attention_layers" not in rep.figures  # the query-patch maps are a class DiT's
    page = rep.path.read_text()
    assert "which image patches attend to it" in page and WORD_ATTENTION_PROMPTS[0] not in rep.notes
