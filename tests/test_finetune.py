"""Fine-tuning: the glyph set, strict folder reading, label-table growth, full / frozen / LoRA runs, merge-lora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.condition import Condition
from ditkit.data.glyphs import make_glyphs
from ditkit.errors import DitkitError, UsageError
from ditkit.finetune import (TABLE_KEY, finetune, grow_label_table, inject_lora, lora_section, merge_lora,
                             plain_weights, read_folder, resume_finetune)
from ditkit.models.dit import DiT, DiTConfig
from ditkit.runs import latest_checkpoint, load_model, load_weights, read_run_config
from ditkit.train.config import TrainConfig
from ditkit.train.loop import train

TINY = dict(model="DiT-T/4", depth=2, width=32, heads=2, objective="linear", batch_size=16, sample_every=0,
            ckpt_every=0, log_every=5, progress=False, device="cpu", precision="fp32", compile=False, seed=0,
            sample_steps=1)  # the end-of-run grid: one step (it is most of a tiny run's time)


# -- the custom set -------------------------------------------------------------------------------------------
def test_glyphs_are_reproducible_and_captioned(tmp_path):
    a = make_glyphs(tmp_path / "a", letters="AB", per_class=3, seed=4)
    make_glyphs(tmp_path / "b", letters="AB", per_class=3, seed=4)
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    assert files == [f"{c}/{c}_{i:04d}.png" for c in "AB" for i in range(3)]
    for f in files:
        x = np.asarray(Image.open(tmp_path / "a" / f))
        assert x.shape == (28, 28) and x.dtype == np.uint8 and x.max() > 200 and x[0].max() < 128  # centred glyph
        assert np.array_equal(x, np.asarray(Image.open(tmp_path / "b" / f)))
    lines = [json.loads(s) for s in (tmp_path / "a" / "captions.jsonl").read_text().splitlines()]
    assert [d["file"] for d in lines] == files and lines[0]["caption"].startswith("the letter A in ")
    assert a["num_images"] == 6 and len(a["fonts"]) >= 4
    other = make_glyphs(tmp_path / "c", letters="AB", per_class=3, seed=5)
    assert other["seed"] == 5 and not np.array_equal(np.asarray(Image.open(tmp_path / "c" / files[0])),
                                                      np.asarray(Image.open(tmp_path / "a" / files[0])))


def test_glyphs_refuse_bad_settings(tmp_path):
    with pytest.raises(UsageError, match="--letters"):
        make_glyphs(tmp_path / "x", letters="AA")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        make_glyphs(tmp_path / "full")


# -- reading a folder strictly -----------------------------------------------------------------------------------
def _png(path: Path, size: int = 28, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_folder_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DitkitError, match="no .png/.jpg/.jpeg images"):
        read_folder(tmp_path / "empty", 28, 1)
    _png(tmp_path / "mixed" / "A" / "a.png", 28)
    _png(tmp_path / "mixed" / "A" / "b.png", 32)
    with pytest.raises(DitkitError, match=r"b\.png: 32x32, but .*a\.png is 28x28"):
        read_folder(tmp_path / "mixed", 28, 1)
    _png(tmp_path / "broken" / "A" / "a.png")
    (tmp_path / "broken" / "A" / "z.png").write_bytes(b"not a png")
    with pytest.raises(DitkitError, match=r"z\.png: unreadable"):
        read_folder(tmp_path / "broken", 28, 1)
    _png(tmp_path / "cap" / "A" / "a.png")
    (tmp_path / "cap" / "captions.jsonl").write_text(json.dumps({"file": "A/a.png", "caption": "ok"}) + "\n"
                                                    + json.dumps({"file": "A/gone.png", "caption": "x"}) + "\n")
    with pytest.raises(DitkitError, match=r"captions\.jsonl, line 2: names 'A/gone\.png'"):
        read_folder(tmp_path / "cap", 28, 1)


def test_folder_reads_classes_captions_and_resizes_one_size(tmp_path):
    for c in "XY":
        for i in range(2):
            _png(tmp_path / "f" / c / f"{i}.png", 56, 100 + 50 * i)
    (tmp_path / "f" / "X" / "1.txt").write_text("a caption beside the image\n")
    f = read_folder(tmp_path / "f", 28, 1)
    assert f.images.shape == (4, 1, 28, 28) and f.class_names == ["X", "Y"] and f.labels.tolist() == [0, 0, 1, 1]
    assert f.captions == {"X/1.png": "a caption beside the image"}


# -- the label table, LoRA merging ---------------------------------------------------------------------------------
def test_new_rows_copy_the_null_row():
    table = torch.arange(12.0).view(4, 3)  # 3 classes + null
    grown = grow_label_table(table, 3, 5, 3)
    assert grown.shape == (6, 3)
    assert torch.equal(grown[:3], table[:3]) and torch.equal(grown[5], table[3])
    assert torch.equal(grown[3], table[3]) and torch.equal(grown[4], table[3])
    assert torch.equal(grow_label_table(None, 0, 2, 3), torch.zeros(3, 3))


def test_merged_lora_equals_the_adapted_network():
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    net = DiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net = inject_lora(net, lora_section(4, 8.0, ("qkv", "fc1", "adaln")))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert TABLE_KEY in trainable and all("lora_" in n or n == TABLE_KEY for n in trainable)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: make the adapter do something
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 300.0, 900.0])
    cond = Condition.from_labels(torch.tensor([0, 2, 3]), 3)
    with torch.no_grad():
        adapted = net(x, t, cond)
        plain = DiT(cfg)
        plain.load_state_dict(plain_weights(net))
        assert (plain(x, t, cond) - adapted).abs().max() < 1e-5


# -- fine-tuning runs (the training loop) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_glyphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_glyphs(root / "glyphs", letters="AB", per_class=16, seed=0)
    base = train(TrainConfig(out=str(root / "base"), dataset="mnist", subset=64, max_steps=6, **TINY))
    return root, base


def test_full_finetune_grows_the_table_from_the_null_row(base_and_glyphs, tmp_path):
    root, base = base_and_glyphs
    run = finetune(base, root / "glyphs", tmp_path / "ft", max_steps=3, **_quiet())
    cfg = read_run_config(run)
    assert cfg["model"]["num_classes"] == 12 and cfg["data"]["class_names"][10:] == ["A", "B"]
    assert cfg["finetune"]["new_classes"] == ["A", "B"] and cfg["train"]["lr"] == 3e-4
    assert cfg["data"]["class_counts"][10:] == [16, 16] and (run / "captions.jsonl").exists()
    model = load_model(run, device="cpu")
    assert model.num_classes == 12 and model.step == 3


def test_frozen_blocks_stay_put_and_resume_is_exact(base_and_glyphs, tmp_path):
    root, base = base_and_glyphs
    base_w = load_weights(latest_checkpoint(base), "ema")
    whole = finetune(base, root / "glyphs", tmp_path / "whole", freeze_blocks=1, max_steps=4, **_quiet())
    w = load_weights(latest_checkpoint(whole), "model")
    assert torch.equal(w["blocks.0.attn.qkv.weight"], base_w["blocks.0.attn.qkv.weight"])
    assert torch.equal(w["x_embedder.proj.weight"], base_w["x_embedder.proj.weight"])
    assert not torch.equal(w["blocks.1.attn.qkv.weight"], base_w["blocks.1.attn.qkv.weight"])
    part = finetune(base, root / "glyphs", tmp_path / "part", freeze_blocks=1, max_steps=2, **_quiet())
    resume_finetune(part, max_steps=4)
    w2 = load_weights(latest_checkpoint(part), "model")
    assert all(torch.equal(w[k], w2[k]) for k in w)


def test_lora_finetune_saves_an_adapter_that_merges_into_its_base(base_and_glyphs, tmp_path):
    root, base = base_and_glyphs
    run = finetune(base, root / "glyphs", tmp_path / "lora", lora=lora_section(4, 8.0, ("qkv", "fc1")),
                   max_steps=3, lr=1e-2, **_quiet())
    adapter = run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "label_table.safetensors", "ditkit.json"} <= {
        p.name for p in adapter.iterdir()}
    merged = merge_lora(adapter, tmp_path / "merged")
    a, b = load_model(run, device="cpu").net, load_model(merged, device="cpu").net  # a: merged at load time
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100.0, 800.0])
    cond = Condition.from_labels(torch.tensor([10, 11]), 12)
    with torch.no_grad():
        assert (a(x, t, cond) - b(x, t, cond)).abs().max() < 1e-5
    base_w = load_weights(latest_checkpoint(base), "ema")
    assert not torch.equal(load_weights(latest_checkpoint(merged), "model")["blocks.0.attn.qkv.weight"],
                           base_w["blocks.0.attn.qkv.weight"])


def test_adapter_for_another_base_is_refused(base_and_glyphs, tmp_path):
    root, base = base_and_glyphs
    run = finetune(base, root / "glyphs", tmp_path / "lora", lora=lora_section(2, 4.0, ("qkv",)), max_steps=1,
                   **_quiet())
    other = train(TrainConfig(out=str(tmp_path / "other"), dataset="mnist", subset=64, max_steps=2,
                              **{**TINY, "seed": 1}))
    with pytest.raises(DitkitError, match="made for other base weights"):
        merge_lora(run, tmp_path / "merged", base=other)
    wide = train(TrainConfig(out=str(tmp_path / "wide"), dataset="mnist", subset=64, max_steps=1,
                             **{**TINY, "width": 64}))
    with pytest.raises(DitkitError, match="another base model.*hidden_size"):
        merge_lora(run, tmp_path / "merged", base=wide)
    assert not (tmp_path / "merged").exists()


def test_bad_finetune_requests(base_and_glyphs, tmp_path):
    root, base = base_and_glyphs
    with pytest.raises(UsageError, match="--freeze-blocks 9"):
        finetune(base, root / "glyphs", tmp_path / "x", freeze_blocks=9, max_steps=1, **_quiet())
    with pytest.raises(UsageError, match="choose one"):
        finetune(base, root / "glyphs", tmp_path / "x", freeze_blocks=1, lora=lora_section(2, 4.0, ("qkv",)),
                 max_steps=1, **_quiet())
    with pytest.raises(UsageError, match="--lora-targets"):
        lora_section(2, 4.0, ("nope",))
    assert not (tmp_path / "x").exists()


def _quiet() -> dict:
    return dict(progress=False, sample_every=0, ckpt_every=0, log_every=1, device="cpu", precision="fp32",
                compile=False, batch_size=16, sample_steps=1)


def test_cli_finetune_lora_then_merge(base_and_glyphs, tmp_path, capsys):
    from ditkit.cli import main

    root, base = base_and_glyphs
    out = tmp_path / "cli"
    assert main(["finetune", "--from", str(base), "--dataset", str(root / "glyphs"), "--out", str(out), "--lora",
                 "--lora-rank", "2", "--lora-targets", "qkv,adaln", "--max-steps", "2", "--batch-size", "16",
                 "--no-progress", "--sample-every", "0", "--sample-steps", "1", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert "adapter" in capsys.readouterr().out
    assert read_run_config(out)["lora"] == {"rank": 2, "alpha": 16.0, "targets": ["qkv", "adaln"]}
    assert main(["merge-lora", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert load_model(tmp_path / "merged", device="cpu").num_classes == 12
    assert main(["finetune", "--from", str(base), "--dataset", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "bad"), "--max-steps", "1"]) != 0
    assert "nowhere: no such folder" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_data_glyphs(tmp_path, capsys):
    from ditkit.cli import main

    assert main(["data", "glyphs", "--out", str(tmp_path / "g"), "--letters", "KL", "--per-class", "2"]) == 0
    assert "4 images of 2 letters" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["K", "L", "captions.jsonl", "glyphs.json"]
    assert main(["data", "glyphs", "--out", str(tmp_path / "g")]) == 2  # not empty: refused, nothing touched
    assert "not empty" in capsys.readouterr().err


def test_finetune_with_diffusers_frequencies_makes_a_model_exportable(base_and_glyphs, tmp_path):
    from ditkit.interop.diffusers import export_diffusers

    root, base = base_and_glyphs
    with pytest.raises(UsageError, match="time_freq_shift=0"):
        export_diffusers(base, tmp_path / "refused")
    run = finetune(base, "mnist", tmp_path / "ft", time_freq_shift=1, max_steps=1, subset=64, **_quiet())
    cfg = read_run_config(run)
    assert cfg["model"]["time_freq_shift"] == 1 and cfg["finetune"]["new_classes"] == []
    assert cfg["model"]["num_classes"] == 10 and cfg["finetune"]["dataset"] == "mnist"
    assert export_diffusers(run, tmp_path / "hf")["max_abs_diff"] <= 1e-5
