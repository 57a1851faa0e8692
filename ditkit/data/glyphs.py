"""A small custom image set to fine-tune on: letters rendered from fonts, offline and reproducibly.

Classes MNIST never saw (letters A-J by default), in a style it never saw (typeset, not handwritten): each
image is one letter from one of matplotlib's bundled fonts (DejaVu and STIX, shipped in matplotlib's package
data, so every machine that has ditkit's dependencies has them), drawn white on black like MNIST with a
random stroke width and a random affine jitter (rotation, shear, scale, shift), rendered at 4x and
downsampled with antialiasing to `size` x `size`. All randomness comes from one seeded numpy generator,
drawn in a fixed order: the same seed, fonts and Pillow version give the same pixels.

    OUT/A/A_0000.png ...        one sub-folder per class (ditkit's image-folder layout)
    OUT/captions.jsonl          {"file": "A/A_0000.png", "caption": "the letter A in DejaVu Serif, bold stroke, tilted 7 degrees"}
    OUT/glyphs.json             how the set was made: seed, sizes, the fonts and their sha256
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import DitkitError, UsageError

DEFAULT_LETTERS = "ABCDEFGHIJ"
# (file in matplotlib's mpl-data/fonts/ttf, the name captions use)
FONTS = (("DejaVuSans.ttf", "DejaVu Sans"), ("DejaVuSans-Bold.ttf", "DejaVu Sans Bold"),
         ("DejaVuSerif.ttf", "DejaVu Serif"), ("DejaVuSerif-Bold.ttf", "DejaVu Serif Bold"),
         ("DejaVuSansMono.ttf", "DejaVu Sans Mono"), ("STIXGeneral.ttf", "STIX General"))
SUPERSAMPLE = 4  # rendered at 4x the target size, then downsampled (antialiased edges, as scanned digits have)
MAX_ROTATION_DEG = 15.0
MAX_SHEAR = 0.25
SCALE_RANGE = (0.75, 1.0)  # glyph height / (0.8 of the image): MNIST digits fill ~20 of 28 pixels
MAX_SHIFT = 0.08  # of the image side
STROKES = (0, 1, 2, 3)  # extra stroke width in supersampled pixels (Pillow's stroke_width): thin to bold
STROKE_WORDS = {0: "thin", 1: "regular", 2: "heavy", 3: "bold"}


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_glyph(letter: str, font: ImageFont.FreeTypeFont, size: int, stroke: int, angle_deg: float,
                 shear: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """One letter, white on black, (size, size) uint8: drawn centred at SUPERSAMPLE x size, warped by the
    affine map (rotation, shear, scale, shift about the centre), downsampled with a Lanczos filter."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font, stroke_width=stroke)
    draw.text(((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top), letter, fill=255, font=font,
              stroke_width=stroke, stroke_fill=255)
    # fit the glyph's height to `scale` of 80% of the side, then rotate and shear about the centre
    s = scale * 0.8 * big / max(bottom - top, right - left, 1)
    a = math.radians(angle_deg)
    fwd = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * s
    inv = np.linalg.inv(fwd)  # PIL maps each output pixel back to its input pixel
    c = np.array([big / 2, big / 2])
    offset = c - inv @ (c + np.array(shift) * big)
    warped = canvas.transform((big, big), Image.Transform.AFFINE,
                              (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]),
                              resample=Image.Resampling.BICUBIC)
    return np.asarray(warped.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def make_glyphs(out: str | os.PathLike, *, letters: str = DEFAULT_LETTERS, per_class: int = 40, size: int = 28,
                seed: int = 0) -> dict[str, Any]:
    """Write the set to `out` (a new or empty folder; written aside and moved into place when complete).
    Returns the description also written to OUT/glyphs.json."""
    if not letters or len(set(letters)) != len(letters) or not all(ch.isalnum() for ch in letters):
        raise UsageError(f"--letters {letters!r}: give distinct letters or digits, e.g. {DEFAULT_LETTERS}")
    if per_class < 1:
        raise UsageError(f"--per-class {per_class}: must be >= 1")
    if size < 8:
        raise UsageError(f"--size {size}: must be >= 8")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: already exists and is not empty; pick a new folder")
    fonts_at = font_dir()
    missing = [f for f, _ in FONTS if not (fonts_at / f).exists()]
    if missing:
        raise DitkitError(f"{fonts_at}: matplotlib's bundled fonts {', '.join(missing)} are missing")
    loaded = [(ImageFont.truetype(str(fonts_at / f), size=size * SUPERSAMPLE), name) for f, name in FONTS]
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        captions = []
        for letter in letters:
            (tmp / letter).mkdir()
            for i in range(per_class):
                # drawn in one fixed order per image: the set depends on the seed alone
                fi = int(rng.integers(len(loaded)))
                stroke = int(rng.choice(STROKES))
                angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
                shear = float(rng.uniform(-MAX_SHEAR, MAX_SHEAR))
                scale = float(rng.uniform(*SCALE_RANGE))
                shift = (float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)), float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)))
                font, font_name = loaded[fi]
                img = render_glyph(letter, font, size, stroke, angle, shear, scale, shift)
                rel = f"{letter}/{letter}_{i:04d}.png"
                Image.fromarray(img, mode="L").save(tmp / rel)
                captions.append({"file": rel, "caption": f"the letter {letter} in {font_name}, "
                                 f"{STROKE_WORDS[stroke]} stroke, tilted {round(angle):d} degrees"})
        (tmp / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
        meta = {"letters": letters, "per_class": per_class, "size": size, "seed": seed, "num_images": len(captions),
                "fonts": {name: {"file": f, "sha256": _sha256(fonts_at / f)} for f, name in FONTS},
                "jitter": {"max_rotation_deg": MAX_ROTATION_DEG, "max_shear": MAX_SHEAR, "scale": list(SCALE_RANGE),
                           "max_shift": MAX_SHIFT, "strokes": list(STROKES), "supersample": SUPERSAMPLE},
                "pillow": Image.__version__}
        (tmp / "glyphs.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
