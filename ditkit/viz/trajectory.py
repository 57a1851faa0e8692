"""Denoising trajectories: the noisy state x_t and the predicted x0 at chosen sampler steps.

Recorded through the samplers' per-step callback (STYLE.md practice 9), which hands over
{"x", "i", "sigma", "denoised"} before each update. x lives in sigma-space (x = x0 + sigma * eps); the
picture shown is the objective's own x_t = alpha(t) * x (Gaussian paths), or the VP scaling
x / sqrt(1 + sigma^2) for DDPM, so the noisy images look the way the network saw them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UsageError
from ..utils import atomic_write_bytes, image_seeds
from .plots import save_figure

DEFAULT_TRAJECTORY_FRAMES = 8  # columns of a strip when no step list is given


@dataclass
class Trajectory:
    """Snapshots of B images at S sampler steps, plus the final images."""

    steps: list[int]  # sampler step index i of each snapshot (0 = first, pure noise)
    sigmas: list[float]  # the noise level of each snapshot
    x_t: np.ndarray  # (S, B, H, W, C) uint8: the noisy state
    x0: np.ndarray  # (S, B, H, W, C) uint8: the model's predicted clean image at that step
    final: np.ndarray  # (B, H, W, C) uint8: the sampler's output
    labels: list[int]
    seeds: list[int]
    total_steps: int
    sampler: str


def pick_steps(total: int, every: Optional[int] = None, at: Optional[Sequence[int]] = None,
               count: int = DEFAULT_TRAJECTORY_FRAMES) -> list[int]:
    """Sampler steps to record: `at` as given, else every `every`-th step, else `count` evenly spaced;
    the first and last steps are always included in the last two cases."""
    if at is not None:
        steps = sorted({int(i) for i in at})
        bad = [i for i in steps if not 0 <= i < total]
        if bad or not steps:
            raise UsageError(f"trajectory steps {bad or list(at)}: the sampler runs steps 0..{total - 1}")
        return steps
    if every is not None:
        if every < 1:
            raise UsageError(f"trajectory every={every}: must be >= 1")
        return sorted(set(range(0, total, every)) | {total - 1})
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, min(count, total))})


def _x_t_scale(objective, sigma: float) -> float:
    """alpha(t(sigma)): the factor from sigma-space x to the objective's x_t."""
    if getattr(objective, "kind", "continuous") == "discrete":
        return 1.0  # a token model's state is its committed tokens, decoded (sigma: the fraction still masked)
    path = getattr(objective, "path", None)
    if path is not None:
        t = path.t_of_sigma(torch.tensor([sigma], dtype=torch.float64)).clamp(path.t_min, path.t_max)
        return float(path.alpha(t)[0])
    return 1.0 / math.sqrt(1.0 + sigma * sigma)  # VP (DDPM): x_t = x / sqrt(1 + sigma^2)


def _u8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def record_trajectory(model, labels: Sequence[int], seeds: Sequence[int], settings=None, *,
                      every: Optional[int] = None, at: Optional[Sequence[int]] = None, **changes) -> Trajectory:
    """Sample B images (one per (label, image seed)) with `settings` (a SamplingSettings, default the untuned
    one; `changes` override its fields) and keep x_t and predicted x0 at the chosen steps.

    `seeds` are per-image seeds as `ditkit.utils.image_seeds` makes them, so image b is the same picture
    that `generate` draws for that seed, label and settings (its first draw, under rejection).
    """
    from ..sampling import sample_batch, validate_sampling

    st = validate_sampling(model, settings, **changes)
    chosen = set(pick_steps(st.steps, every, at))
    xs, x0s, got_steps, sigmas = [], [], [], []

    def callback(d: dict) -> None:
        i = int(d["i"])
        if i in chosen:
            s = float(d["sigma"])
            got_steps.append(i)
            sigmas.append(s)
            xs.append(_u8(d["x"] * _x_t_scale(model.objective, s)))
            x0s.append(_u8(d["denoised"]))

    final = sample_batch(model, list(labels), list(seeds), st, callback=callback)
    if not got_steps:  # a sampler that reports no steps: keep the final image only
        empty = np.zeros((0, *_u8(final).shape), np.uint8)
        return Trajectory([], [], empty, empty.copy(), _u8(final), list(labels), list(seeds), st.steps, st.sampler)
    return Trajectory(got_steps, sigmas, np.stack(xs), np.stack(x0s), _u8(final), list(labels), list(seeds), st.steps,
                      st.sampler)


def plot_trajectory(traj: Trajectory, out: str | Path, class_names: Optional[Sequence[str]] = None) -> Path:
    """A PNG strip: per image, a row of x_t and a row of predicted x0; columns = recorded steps, then the output."""
    from matplotlib.figure import Figure

    S, B = traj.x_t.shape[:2]
    cols = S + 1
    fig = Figure(figsize=(1.1 * cols + 0.6, 1.2 * 2 * B + 0.5), dpi=110)
    axes = fig.subplots(2 * B, cols, squeeze=False)
    for b in range(B):
        lab = traj.labels[b]
        name = (class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)) if lab >= 0 else "-"
        for k in range(cols):
            for r, kind in enumerate(("x_t", "x0")):
                ax = axes[2 * b + r, k]
                if k < S:
                    img = (traj.x_t if kind == "x_t" else traj.x0)[k, b]
                elif r == 0:
                    img = traj.final[b]
                else:
                    ax.axis("off")
                    continue
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and r == 0:
                    ax.set_title(f"step {traj.steps[k]}\nσ={traj.sigmas[k]:.3g}" if k < S else "output", fontsize=7)
            axes[2 * b, 0].set_ylabel(f"x_t\nlabel {name}", fontsize=7)
            axes[2 * b + 1, 0].set_ylabel("predicted x0", fontsize=7)
    fig.suptitle(f"denoising trajectory: {traj.sampler}, {traj.total_steps} steps", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def trajectory_gif(traj: Trajectory, out: str | Path, scale: int = 6, frame_ms: int = 300) -> Path:
    """An animated GIF: each frame shows [x_t | predicted x0] for every image (stacked), then the output."""
    from PIL import Image, ImageDraw

    from .grids import make_grid

    frames = []
    S = traj.x_t.shape[0]
    for k in range(S + 1):
        left = traj.x_t[k] if k < S else traj.final
        right = traj.x0[k] if k < S else traj.final
        pairs = np.stack([p for b in range(len(left)) for p in (left[b], right[b])])  # (2B, H, W, C)
        pic = make_grid(pairs, nrow=2, pad=2, scale=scale)
        pic = pic[..., 0] if pic.shape[-1] == 1 else pic
        img = Image.fromarray(pic).convert("RGB")
        canvas = Image.new("RGB", (img.width, img.height + 14), "black")
        canvas.paste(img, (0, 14))
        text = (f"step {traj.steps[k]}/{traj.total_steps}  sigma {traj.sigmas[k]:.3g}:  x_t | predicted x0" if k < S
                else "output")
        ImageDraw.Draw(canvas).text((3, 1), text, fill="white")  # Pillow's built-in bitmap font: no files
        frames.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE))
    durations = [frame_ms] * S + [frame_ms * 5]  # linger on the result
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def save_trajectory(model, label: Optional[int], seed: int, path: str | Path, settings=None, *,
                    every: Optional[int] = None, **changes) -> Path:
    """Write the trajectory of one image as a PNG strip (`.png`) or an animated GIF (`.gif`).

    The image is image 0 of `ditkit sample --seed SEED --labels LABEL` with the same settings (same per-image
    seed), so the strip ends on the picture that command draws first. `label` None: class 0 (unconditional
    models ignore it). `every`: record every k-th step (default: about 8 evenly spaced steps for a PNG,
    every step for a GIF); the last step and the output are always shown. `settings`/`changes`: as for
    `record_trajectory`.
    """
    from ..sampling import parse_labels

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".png", ".gif"):
        raise UsageError(f"--trajectory {path}: the file must end in .png (a strip) or .gif (an animation)")
    labels = parse_labels(None if label is None else [int(label)], 1, model.num_classes)
    if every is None and kind == ".gif":
        every = 1
    traj = record_trajectory(model, labels, image_seeds(seed, 1), settings, every=every, **changes)
    if kind == ".gif":
        return trajectory_gif(traj, path)
    return plot_trajectory(traj, path, model.class_names if model.num_classes else None)
