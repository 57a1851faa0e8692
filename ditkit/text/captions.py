"""Captions: generated for MNIST from each digit, or read from a user's caption file.

MNIST captions name the digit (numeral "7" or word "seven") in one of several templates, with attributes
measured from the image itself:
- stroke thickness: the ink mass, sum(pixels) / 255 (a thicker pen lays more ink on the same shape);
- slant: the shear of the ink's principal axis from its second moments, -mu_xy / mu_yy (x to the right,
  y down; > 0: the top leans right), the quantity deskewing divides out (LeCun et al. 1998);
- size: the area of the ink's bounding box (MNIST fits every digit in a 20x20 box by its longer side, so
  the area varies with the other side).
Each is binned into words by the training set's own terciles, per digit (a bold 1 is bold for a 1):
thin / - / bold, slanted left / upright / slanted right, small / - / large.

TEMPLATES are used in training; HELD_OUT_TEMPLATES never are: `held_out_prompts` builds the prompts the
evaluation uses from them, so that a model is judged on phrasings it has not seen.

A caption file (`--captions FILE.jsonl`) has one {"file": ..., "text": ...} per line, the file relative to
the caption file's folder; every line must hold, or nothing trains (a clear error names the line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DitkitError, UsageError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", None, "bold")
SLANT_WORDS = ("slanted left", "upright", "slanted right")
SIZE_WORDS = ("small", None, "large")
ATTRIBUTES = ("thickness", "slant", "size")
# {a}: the article, {desc}: size and thickness adjectives then the digit ("small bold seven"), {slant}: ",
# slanted left" or nothing. Training draws from TEMPLATES only.
TEMPLATES = (
    "{a} {desc}{slant}",
    "{desc}{slant}",
    "a handwritten {desc}{slant}",
    "an image of {a} {desc}{slant}",
    "a picture of {a} {desc}{slant}",
    "{a} {desc}{slant}, written by hand",
    "a drawing of {a} {desc}{slant}",
    "{a} {desc}{slant} on a black background",
)
HELD_OUT_TEMPLATES = (
    "a photo of {a} {desc}{slant}",
    "please draw {a} {desc}{slant}",
    "{a} {desc}{slant}, in white ink",
    "show me {a} {desc}{slant}",
)
MENTION_P = 0.8  # the chance a caption names an attribute whose bin has a word (else the marginal is learned)
CAPTION_SEED = 52


def digit_form(digit: int, word: bool) -> str:
    return DIGIT_WORDS[digit] if word else str(digit)


def article(next_word: str) -> str:
    """'a' or 'an' by the sound of the next word ("an 8", "an eight", "a one")."""
    w = next_word.lower()
    return "an" if w.startswith(("a", "e", "i", "o", "u", "8", "11", "18")) and not w.startswith("one") else "a"


def compose(template: str, digit: int, *, word: bool, thickness: Optional[str] = None, slant: Optional[str] = None,
            size: Optional[str] = None) -> str:
    """One caption: `template` filled with the digit and the attribute words given (None: not named)."""
    adjs = [w for w in (size, thickness) if w]
    desc = " ".join(adjs + [digit_form(digit, word)])
    return template.format(a=article(desc.split()[0]), desc=desc, slant=f", {slant}" if slant else "")


# -- measuring the attributes ------------------------------------------------------------------------------
def measure(images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Images (N, H, W) or (N, 1, H, W) uint8 -> {"thickness": ink mass (N,), "slant": shear (N,), "size":
    bounding-box area in pixels (N,)}, float64. Shared by the captions and the attribute figures."""
    x = torch.as_tensor(np.asarray(images)).to(torch.float64)
    if x.ndim == 4:
        x = x.mean(1)  # (N, H, W): grey
    x = x / 255.0
    N, H, W = x.shape
    ys = torch.arange(H, dtype=torch.float64).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, W)
    mass = x.sum((1, 2))  # (N,)
    m = mass.clamp(min=1e-9)
    cy = (x * ys).sum((1, 2)) / m
    cx = (x * xs).sum((1, 2)) / m
    dy, dx = ys - cy.view(N, 1, 1), xs - cx.view(N, 1, 1)
    mu_yy = (x * dy * dy).sum((1, 2)) / m
    mu_xy = (x * dx * dy).sum((1, 2)) / m
    slant = -mu_xy / mu_yy.clamp(min=1e-9)  # y grows downwards: a top leaning right has x falling with y
    ink = x > 0.25  # (N, H, W) the pixels of the stroke
    rows, cols = ink.any(2), ink.any(1)  # (N, H), (N, W)

    def extent(a: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(a.shape[1], dtype=torch.float64)
        first = torch.where(a, idx, torch.inf).amin(1)
        last = torch.where(a, idx, -torch.inf).amax(1)
        return (last - first + 1).clamp(min=0).nan_to_num(0.0)

    size = extent(rows) * extent(cols)
    return {"thickness": mass.numpy(), "slant": slant.numpy(), "size": size.numpy()}


@dataclass(frozen=True)
class AttributeBins:
    """Per digit, the terciles (lo, hi) of each attribute in the training set: bin 0 below lo, 2 above hi."""
    edges: dict[str, np.ndarray]  # attribute -> (10, 2) float64

    @classmethod
    def fit(cls, values: dict[str, np.ndarray], labels: np.ndarray) -> "AttributeBins":
        edges = {}
        for a in ATTRIBUTES:
            e = np.zeros((10, 2))
            for d in range(10):
                v = values[a][labels == d]
                e[d] = np.quantile(v, [1 / 3, 2 / 3]) if len(v) else (np.inf, np.inf)
            edges[a] = e
        return cls(edges)

    def bins(self, values: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
        """attribute -> (N,) bin in {0, 1, 2}."""
        out = {}
        for a in ATTRIBUTES:
            lo, hi = self.edges[a][labels, 0], self.edges[a][labels, 1]
            out[a] = (values[a] > lo).astype(np.int64) + (values[a] > hi).astype(np.int64)
        return out


def mnist_captions(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                   bins: Optional[AttributeBins] = None, seed: int = CAPTION_SEED) -> list[str]:
    """One caption per image, from the training templates: deterministic in (images, labels, seed). `bins`
    defaults to the terciles of these images (pass the training set's when captioning others)."""
    labels = np.asarray(labels, dtype=np.int64)
    values = measure(images)
    bins = bins or AttributeBins.fit(values, labels)
    b = bins.bins(values, labels)
    N = len(labels)
    rng = np.random.default_rng(seed)
    template = rng.integers(len(TEMPLATES), size=N)
    word = rng.random(N) < 0.5
    named = rng.random((N, 3)) < MENTION_P
    out = []
    for i in range(N):
        thick = THICKNESS_WORDS[b["thickness"][i]] if named[i, 0] else None
        slant = SLANT_WORDS[b["slant"][i]] if named[i, 1] else None
        size = SIZE_WORDS[b["size"][i]] if named[i, 2] else None
        out.append(compose(TEMPLATES[template[i]], int(labels[i]), word=bool(word[i]), thickness=thick,
                           slant=slant, size=size))
    return out


def held_out_prompts(digits: Sequence[int] = range(10), *, attributes: bool = True) -> list[dict[str, Any]]:
    """Evaluation prompts from HELD_OUT_TEMPLATES only: per digit, per template, the numeral and the word
    (plain, or with `attributes`, one per thickness word and one per slant word). Each is {"text", "digit",
    "thickness", "slant", "size"} (None: not named)."""
    out = []
    for d in digits:
        for t in HELD_OUT_TEMPLATES:
            for word in (False, True):
                if not attributes:
                    out.append(dict(text=compose(t, d, word=word), digit=d, thickness=None, slant=None, size=None))
                    continue
                for th in ("thin", "bold"):
                    out.append(dict(text=compose(t, d, word=word, thickness=th), digit=d, thickness=th, slant=None,
                                    size=None))
                for sl in ("slanted left", "slanted right"):
                    out.append(dict(text=compose(t, d, word=word, slant=sl), digit=d, thickness=None, slant=sl,
                                    size=None))
    return out


# -- caption files -------------------------------------------------------------------------------------------
def read_caption_file(path: str | Path) -> list[tuple[Path, str]]:
    """A JSONL caption file -> [(image path, text)]. Every line must be an object with a "file" (relative to the
    caption file's folder, or absolute) that exists and a non-empty "text"; the first bad line raises a
    `DitkitError` naming it (nothing is skipped: a run never trains on a silently shortened set)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DitkitError(f"--captions {path}: no such file (give 'mnist' or a .jsonl caption file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DitkitError(f"--captions {path}: not UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--captions {path} line {n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DitkitError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(rec, dict) or set(rec) - {"file", "text"} or not {"file", "text"} <= set(rec):
            raise DitkitError(f'{where}: must be {{"file": ..., "text": ...}} and nothing else, got {line.strip()[:80]}')
        if not isinstance(rec["file"], str) or not rec["file"]:
            raise DitkitError(f'{where}: "file" must be a non-empty string')
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DitkitError(f'{where}: "text" must be a non-empty string')
        image = Path(rec["file"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DitkitError(f"{where}: image {rec['file']!r} not found (looked at {image})")
        out.append((image, rec["text"]))
    if not out:
        raise DitkitError(f"--captions {path}: no caption lines")
    return out


def load_caption_dataset(path: str | Path, image_size: Optional[int], channels: Optional[int] = None):
    """A caption file's images as an ImageDataset (no classes) with its captions, one per image."""
    from ..data.dataset import ImageDataset
    from ..data.folder import load_image

    if image_size is None:
        raise UsageError("--captions FILE.jsonl: set --image-size (the images are resized to it)")
    channels = 3 if channels is None else channels
    entries = read_caption_file(path)
    images = np.empty((len(entries), channels, image_size, image_size), dtype=np.uint8)
    for i, (image, _) in enumerate(entries):
        images[i] = load_image(image, int(image_size), channels)
    return ImageDataset(torch.from_numpy(images), torch.zeros(len(entries), dtype=torch.long), 0, [],
                        Path(path).stem, [text for _, text in entries])


def captioned_dataset(spec: str, dataset: str, image_size: Optional[int] = None, channels: Optional[int] = None):
    """The training set of `ditkit train --captions SPEC`: MNIST with its generated captions ("mnist", with
    --dataset mnist), or a caption file's images and texts."""
    from ..data import load_dataset

    spec = check_captions_spec(spec)
    if spec == "mnist":
        if dataset != "mnist":
            raise UsageError(f"--captions mnist: generated for the MNIST digits; --dataset is {dataset!r} "
                             "(give a .jsonl caption file for other images)")
        data = load_dataset("mnist", image_size=image_size, channels=channels)
        return replace(data, captions=mnist_captions(data.images, data.labels))
    return load_caption_dataset(spec, image_size, channels)


def check_captions_spec(spec: str) -> str:
    """--captions: 'mnist' or the path of a .jsonl file."""
    if spec == "mnist" or spec.endswith(".jsonl"):
        return spec
    raise UsageError(f"--captions {spec!r}: allowed 'mnist' (captions generated from the digits) or a .jsonl "
                     'file of {"file": ..., "text": ...} lines')


def caption_words(text: str) -> dict[str, Optional[str]]:
    """The attribute words a caption names: {"thickness", "slant", "size"} -> word or None (for the figures)."""
    t = f" {text.lower()} "
    found: dict[str, Optional[str]] = {}
    for a, words in (("thickness", THICKNESS_WORDS), ("slant", SLANT_WORDS), ("size", SIZE_WORDS)):
        found[a] = next((w for w in words if w and f" {w}" in t.replace(",", " ")), None)
    return found


def grid_prompts(captions: Optional[str]) -> list[str]:
    """The prompts of a text run's sample grids, one per column: each digit for MNIST's captions; for a
    caption file, prompts that name no content ("an image", ...), since its subjects are unknown here."""
    if captions == "mnist":
        return [f"a handwritten {w}" for w in DIGIT_WORDS]
    return ["an image", "a picture", "a small image", "a large image"]
