"""A run's metrics.jsonl: reading it, smoothing its curves, and RUN/loss.png, which training draws at the
end of a run. The report (ditkit.viz.plots) draws the rest of the curves from the same pieces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .images import save_figure


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Records of metrics.jsonl; a half-written last line (a killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def read_metrics_checked(run_dir: str | Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines): like `read_metrics`, but says how much was skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out, bad = [], 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                out.append(rec)
            else:
                bad += 1
    return out, bad


def smooth(values: np.ndarray, x: Optional[np.ndarray] = None, half_window: Optional[int] = None,
           log: bool = False) -> np.ndarray:
    """A smoothed copy of `values` (N,) that follows the data: at each point, the value of a straight line
    fitted by least squares to the points within `half_window` on either side (a local linear fit, LOESS
    of degree 1 with a flat kernel; Cleveland 1979). A centred window has no lag: an exponential moving
    average of a falling loss lies above it all along (by its lag times the slope), while a local line is
    exact on any linear stretch; at the ends the window is cut short and the line still fits, so the first
    and last points are not pulled toward the middle. `x`: the points' positions (default 0..N-1);
    `half_window`: default 2.5% of the points (at least 2); `log`: fit log(values), for positive curves
    drawn on a log scale (exact on an exponential decay)."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < 3:
        return y.copy()
    if log:
        if np.any(y <= 0):
            raise ValueError("smooth(log=True) needs positive values")
        y = np.log(y)
    x = np.arange(n, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    span = x[-1] - x[0]
    x = (x - x[0]) / span if span > 0 else np.zeros(n)  # on [0, 1]: the window sums below stay well scaled
    h = max(2, round(0.025 * n)) if half_window is None else int(half_window)
    lo = np.clip(np.arange(n) - h, 0, n)
    hi = np.clip(np.arange(n) + h + 1, 0, n)

    def window_sum(v: np.ndarray) -> np.ndarray:  # sum of v over [lo, hi) for every point, from a prefix sum
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[hi] - c[lo]

    # least squares y ~ a + b (x - x_i) over the window of point i, in centred coordinates
    s0 = (hi - lo).astype(np.float64)
    s1, s2 = window_sum(x), window_sum(x * x)
    sy, sxy = window_sum(y), window_sum(x * y)
    mx, my = s1 / s0, sy / s0
    var = s2 / s0 - mx * mx
    cov = sxy / s0 - mx * my
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(var > 1e-12, cov / np.where(var > 1e-12, var, 1.0), 0.0)
    out = my + slope * (x - mx)
    return np.exp(out) if log else out


def tail_mean(values: np.ndarray, frac: float = 0.05) -> tuple[int, float]:
    """(k, mean of the last k values): the end of a curve with its noise averaged out, k = 5% of the points
    (at least 1, at most 50)."""
    k = int(min(50, max(1, round(frac * len(values)))))
    return k, float(np.mean(np.asarray(values, dtype=np.float64)[-k:]))


def plot_loss(run_dir: str | Path, out: Optional[str | Path] = None) -> Optional[Path]:
    """loss.png: the training loss (raw and smoothed) against step, log scale. None if nothing is logged."""
    recs = read_metrics(run_dir)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = np.array([r["step"] for r in recs])
    loss = np.array([r.get("loss_avg", r["loss"]) for r in recs])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(step, loss, alpha=0.35, lw=1, label="loss")
    ax.plot(step, smooth(loss, step, log=bool(np.all(loss > 0))), lw=2, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = save_figure(fig, Path(out) if out else Path(run_dir) / "loss.png")
    plt.close(fig)
    return out
