"""MNIST captions from measured attributes, held-out templates, and caption files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ditkit.errors import DitkitError, UsageError
from ditkit.text import captions as cap


def stroke(slant: float = 0.0, width: int = 2, height: int = 16, top: int = 6) -> np.ndarray:
    """A vertical bar (28, 28) uint8 whose column shifts by `slant` pixels per row upwards."""
    img = np.zeros((28, 28), dtype=np.uint8)
    for r in range(top, top + height):
        c = int(round(14 + slant * (top + height / 2 - r)))
        img[r, c - width // 2:c - width // 2 + width] = 255
    return img


def test_measure_reads_slant_ink_and_bounding_box():
    imgs = np.stack([stroke(0.0), stroke(0.4), stroke(-0.4), stroke(0.0, width=4), stroke(0.0, height=8)])
    m = cap.measure(imgs)
    assert abs(m["slant"][0]) < 1e-9 and m["slant"][1] > 0.3 and m["slant"][2] < -0.3  # top leaning right: > 0
    assert m["slant"][1] == pytest.approx(-m["slant"][2])
    assert m["thickness"][3] == pytest.approx(2 * m["thickness"][0])  # twice the ink
    assert m["size"][0] == 2 * 16 and m["size"][4] == 2 * 8  # bounding-box area
    assert cap.measure(imgs[:, None])["slant"] == pytest.approx(m["slant"])  # (N, 1, H, W) too


def test_bins_are_per_digit_terciles_and_words_follow_them():
    rng = np.random.default_rng(0)
    values = {a: rng.normal(size=300) for a in cap.ATTRIBUTES}
    labels = np.repeat([3, 7], 150)
    values["thickness"][labels == 7] += 100  # a 7 is bolder than a 3 everywhere: its bins are its own
    bins = cap.AttributeBins.fit(values, labels)
    b = bins.bins(values, labels)
    for d in (3, 7):
        counts = np.bincount(b["thickness"][labels == d], minlength=3)
        assert counts.tolist() == [50, 50, 50]


def test_captions_are_deterministic_name_the_digit_and_use_training_templates_only():
    from ditkit.data import load_mnist
    x, y = load_mnist("train")
    x, y = x[:600], y[:600]
    a, b = cap.mnist_captions(x, y), cap.mnist_captions(x, y)
    assert a == b and len(a) == 600 and len(set(a)) > 200
    for text, d in zip(a, y):
        words = text.replace(",", " ").split()
        assert str(d) in words or cap.DIGIT_WORDS[d] in words
        assert not any(held.split("{")[0] and text.startswith(held.split("{")[0]) for held in
                       ("a photo of", "please draw", "show me")) and "white ink" not in text
    # attributes follow the measurement: "bold" captions have more ink than "thin" ones of the same digit
    m = cap.measure(x)
    for d in (0, 1):
        bold = [m["thickness"][i] for i, t in enumerate(a) if y[i] == d and " bold " in f" {t} "]
        thin = [m["thickness"][i] for i, t in enumerate(a) if y[i] == d and " thin " in f" {t} "]
        assert bold and thin and min(bold) > max(thin)


def test_articles_and_composition():
    assert cap.compose("{a} {desc}{slant}", 8, word=True, thickness="bold") == "a bold eight"
    assert cap.compose("{a} {desc}{slant}", 8, word=False) == "an 8"
    assert cap.compose("{a} {desc}{slant}", 1, word=True, slant="upright") == "a one, upright"
    assert cap.compose("{desc}{slant}", 7, word=True, size="small", thickness="thin", slant="slanted left") \
        == "small thin seven, slanted left"


def test_held_out_prompts_come_from_held_out_templates_and_pair_attributes():
    prompts = cap.held_out_prompts([7])
    texts = [p["text"] for p in prompts]
    assert len(texts) == len(cap.HELD_OUT_TEMPLATES) * 2 * 4 and len(set(texts)) == len(texts)
    assert not set(cap.TEMPLATES) & set(cap.HELD_OUT_TEMPLATES)
    assert "a photo of a bold seven" in texts and "a photo of a thin seven" in texts
    assert all(p["digit"] == 7 for p in prompts)
    assert cap.caption_words("please draw a thin 7, slanted left") == {"thickness": "thin", "slant": "slanted left",
                                                                     "size": None}


def test_caption_file_loads_and_refuses_bad_lines(tmp_path):
    for i in range(2):
        Image.fromarray(stroke(0.2 * i)).save(tmp_path / f"d{i}.png")
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"file": "d0.png", "text": "a bar"}) + "\n\n"
                 + json.dumps({"file": str(tmp_path / "d1.png"), "text": "a slanted bar"}) + "\n")
    data = cap.load_caption_dataset(f, image_size=16, channels=1)
    assert len(data) == 2 and data.captions == ["a bar", "a slanted bar"] and data.image_shape == (1, 16, 16)
    assert data.subset(1).captions == ["a bar"] and data.num_classes == 0

    def bad(body: str, match: str) -> None:
        f.write_text(json.dumps({"file": "d0.png", "text": "ok"}) + "\n" + body + "\n")
        with pytest.raises(DitkitError, match=match):
            cap.read_caption_file(f)

    bad('{"file": "gone.png", "text": "x"}', r"line 2: image 'gone.png' not found")
    bad("not json", "line 2: not a JSON object")
    bad('{"file": "d1.png"}', "line 2: must be")
    bad('{"file": "d1.png", "text": "  "}', 'line 2: "text" must be a non-empty string')
    bad('{"file": "d1.png", "text": "x", "label": 3}', "line 2: must be")
    f.write_bytes(b'{"file": "d0.png", "text": "\xff"}\n')
    with pytest.raises(DitkitError, match="not UTF-8"):
        cap.read_caption_file(f)
    with pytest.raises(DitkitError, match="no such file"):
        cap.read_caption_file(tmp_path / "none.jsonl")
    with pytest.raises(UsageError, match="--captions 'foo'"):
        cap.check_captions_spec("foo")


def test_prompt_matched_fid_rewards_digits_that_match_their_prompts():
    """Prompts that all ask for bold digits: real bold digits sit near the prompt-matched floor (while the
    plain MNIST yardstick, which expects every thickness, ranks them far from real); thin ones do not."""
    from ditkit.data.mnist import load_mnist
    from ditkit.text.adherence import prompt_matched_fid

    x, y = load_mnist("train")
    bins = cap.AttributeBins.fit(cap.measure(x), y).bins(cap.measure(x), y)
    rng = np.random.default_rng(1)
    prompts, bold, thin = [], [], []
    for d in range(10):
        for b, out in ((2, bold), (0, thin)):
            out.extend(x[rng.choice(np.flatnonzero((y == d) & (bins["thickness"] == b)), 60, replace=False)])
        prompts += [{"digit": d, "thickness": "bold", "slant": None}] * 60
    match = prompt_matched_fid(np.stack(bold)[..., None], prompts)
    wrong = prompt_matched_fid(np.stack(thin)[..., None], prompts)
    assert match["fid_ratio_prompt_matched"] < 1.5
    assert wrong["fid_ratio_prompt_matched"] > 3 * match["fid_ratio_prompt_matched"]
