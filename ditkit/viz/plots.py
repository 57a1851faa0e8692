"""The report's figures: every logged training curve, and evaluation results across checkpoints. Reading
and smoothing metrics.jsonl, and the loss plot that training draws, live in `ditkit.metrics`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..images import save_figure
from ..metrics import plot_loss, read_metrics, read_metrics_checked, smooth, tail_mean  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The report's figures: every logged curve, and evaluation results across checkpoints.
# ---------------------------------------------------------------------------------------------

# (key in metrics.jsonl, axis label, log scale)
CURVES = (("loss", "loss", True), ("grad_norm", "gradient norm (before clipping)", True),
          ("lr", "learning rate", False), ("img_per_s", "images / s", False))


def _series(recs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a finite number under `key`."""
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def plot_curves(recs: list[dict], out: str | Path) -> tuple[Optional[Path], list[str]]:
    """curves.png: loss, gradient norm, learning rate and img/s against step, raw and smoothed.

    Returns (path or None when nothing is plottable, the metric keys that were absent)."""
    from matplotlib.figure import Figure

    present = [(k, label, log) for k, label, log in CURVES if len(_series(recs, k)[0])]
    missing = [k for k, _, _ in CURVES if k not in {p[0] for p in present}]
    if not present:
        return None, missing
    cols = 2 if len(present) > 1 else 1
    rows = (len(present) + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.0 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (key, label, log) in zip(axes, present):
        step, val = _series(recs, key)
        ax.plot(step, val, alpha=0.35, lw=1, label="raw")
        if key != "lr" and len(val) > 2:
            ax.plot(step, smooth(val, step, log=bool(log and np.all(val > 0))), lw=2, label="smoothed")
            ax.legend(fontsize=7)
        if log and np.all(val > 0):
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # 1.5, not 1.5 x 10^0
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, Path(out)), missing


def plot_eval(results: list[dict], out: str | Path) -> Optional[Path]:
    """eval.png: FID (with its confidence interval) and class accuracy against checkpoint step, one line per
    sampling setting. `results` are normalised records (see `ditkit.viz.report.read_eval_results`)."""
    from matplotlib.figure import Figure

    if not results:
        return None
    fig = Figure(figsize=(10.4, 3.3), dpi=100)
    ax_fid, ax_acc = fig.subplots(1, 2)
    settings = sorted({r["setting"] for r in results})
    for setting in settings:
        rs = sorted((r for r in results if r["setting"] == setting), key=lambda r: r["step"])
        f = [r for r in rs if r["fid"] is not None]
        if f:
            x = np.array([r["step"] for r in f], dtype=float)
            y = np.array([r["fid"] for r in f])
            lo = np.array([r["fid_lo"] if r["fid_lo"] is not None else r["fid"] for r in f])
            hi = np.array([r["fid_hi"] if r["fid_hi"] is not None else r["fid"] for r in f])
            ax_fid.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], marker="o", capsize=3,
                            label=setting)
        a = [r for r in rs if r["acc"] is not None]
        if a:
            ax_acc.plot([r["step"] for r in a], [100 * r["acc"] for r in a], marker="o", label=setting)
    ax_fid.set_ylabel("FID (lower is better)")
    ax_acc.set_ylabel("class accuracy, %")
    ax_acc.set_ylim(0, 100)
    for ax in (ax_fid, ax_acc):
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(out))
