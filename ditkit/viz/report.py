"""`ditkit report RUN`: one offline HTML page that shows what a run holds and what its model does.

    RUN/report.html            the page (inline CSS, no scripts, no fonts or anything else from the network)
    RUN/report_files/*.png     its figures, referenced by relative paths

Sections, each built from whatever the run holds (a missing piece becomes a note, never a crash):
key figures; training curves (metrics.jsonl); EMA samples of every checkpoint with fixed seeds and labels;
FID / class accuracy across checkpoints (RUN/eval/*.json, or the command that makes them); a denoising
trajectory; attention maps; a t-SNE of the network's features; the sampler benchmark plot; config.json.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import DitkitError, UsageError
from ..evaluate import image_settings
from ..runs import list_checkpoints, read_run_config
from ..utils import atomic_write_bytes, image_seeds, pick_device
from .plots import save_figure
from .attention import DEFAULT_ATTN_SIGMA

REPORT_FILES = "report_files"
FIGURES = ("curves", "samples", "trajectory", "attention", "attention_layers", "tsne", "eval",
           "bench_samplers_fid_vs_nfe")  # the PNGs a build writes into report_files/
BENCH_PLOT = Path("docs") / "bench" / "samplers_fid_vs_nfe.png"  # relative to the repository root
EVAL_HINT = "ditkit eval --ckpt {ckpt} --sampler dpm++2m --steps 20 --cfg-scale 2 --num 2000"


@dataclass
class ReportOptions:
    """Everything the report samples or computes; the defaults keep a DiT-T/4 report well under a minute on CPU."""

    sampler: str = "dpm++2m"
    steps: int = 10  # sampler steps of the checkpoint grid, the trajectory and nothing else
    cfg_scale: Optional[float] = None  # None: the run's sample_cfg_scale (class models), 1 otherwise
    num_per_ckpt: int = 10  # images per checkpoint row (fixed seeds and labels: rows compare)
    max_checkpoints: int = 12  # more checkpoints than this: evenly spaced ones, first and last included
    seed: int = 0
    weights: str = "ema"
    device: str = "auto"
    image: int = 0  # which image of the newest row the trajectory and the attention maps show
    layer: Optional[int] = None  # attention layer; None: the last
    head: Optional[int] = 0  # the head drawn as "chosen" (all heads and their mean are drawn)
    query: Optional[int] = None  # query patch; None: the patch with the most ink
    attn_sigma: float = DEFAULT_ATTN_SIGMA
    traj_steps: Optional[list[int]] = None  # sampler steps shown in the trajectory; None: evenly spaced
    tsne: bool = True
    tsne_features: str = "final"  # "final" (pooled tokens before final_layer) or "patch" (patch embeddings)
    tsne_points: int = 500

    def validate(self) -> "ReportOptions":
        from ..samplers import get_sampler
        from .embeddings import FEATURE_KINDS

        get_sampler(self.sampler)  # raises a UsageError naming the allowed samplers
        if self.steps < 1:
            raise UsageError(f"--steps {self.steps}: must be >= 1")
        if self.num_per_ckpt < 1:
            raise UsageError(f"--num-per-ckpt {self.num_per_ckpt}: must be >= 1")
        if self.max_checkpoints < 1:
            raise UsageError(f"--max-checkpoints {self.max_checkpoints}: must be >= 1")
        if not 0 <= self.image < self.num_per_ckpt:
            raise UsageError(f"--image {self.image}: the report draws {self.num_per_ckpt} images per checkpoint "
                             f"(0-{self.num_per_ckpt - 1}); raise --num-per-ckpt to show a later one")
        if self.cfg_scale is not None and not (np.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise UsageError(f"--cfg-scale {self.cfg_scale}: must be a finite number >= 0")
        if self.tsne_features not in FEATURE_KINDS:
            raise UsageError(f"--tsne-features {self.tsne_features!r}: allowed {', '.join(FEATURE_KINDS)}")
        if not (np.isfinite(self.attn_sigma) and self.attn_sigma > 0):
            raise UsageError(f"--attn-sigma {self.attn_sigma}: must be a finite number > 0")
        if self.tsne_points < 5:
            raise UsageError(f"--tsne-points {self.tsne_points}: must be >= 5")
        if self.weights not in ("ema", "model"):
            raise UsageError(f"--weights {self.weights!r}: allowed ema, model")
        pick_device(self.device)  # a device this machine lacks: refused now, not as a note per checkpoint
        return self


@dataclass
class Report:
    path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was missing or skipped, in words
    seconds: dict[str, float] = field(default_factory=dict)  # time per section

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


# ---------------------------------------------------------------------------------------------
# Reading the run folder.
# ---------------------------------------------------------------------------------------------


def _step_of(name: str) -> Optional[int]:
    m = re.search(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def read_eval_results(run: Path) -> tuple[list[dict], list[str]]:
    """Normalised records of RUN/eval/**/*.json, read tolerantly, and notes on the files that were unusable.

    A record: {"file", "step", "setting", "sampler", "steps", "cfg_scale", "fid", "fid_lo", "fid_hi", "n", "acc"}.
    `fid` may be a number or {value, ci_low, ci_high, n}; `class_accuracy` a number or {value, ...}.
    """
    root = run / "eval"
    out, notes = [], []
    if not root.is_dir():
        return out, notes
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(run).as_posix()
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{rel}: unreadable ({str(e)[:80]}); skipped")
            continue
        if not isinstance(d, dict):
            notes.append(f"{rel}: not a JSON object; skipped")
            continue
        step = d.get("checkpoint_step", d.get("step"))
        if not isinstance(step, int):
            step = _step_of(str(d.get("checkpoint", ""))) or _step_of(p.name)
        fid, lo, hi, n = d.get("fid"), None, None, d.get("n")
        if isinstance(fid, dict):
            lo, hi, n = _num(fid.get("ci_low")), _num(fid.get("ci_high")), fid.get("n", n)
            fid = fid.get("value")
        elif isinstance(d.get("fid_ci"), (list, tuple)) and len(d["fid_ci"]) == 2:
            lo, hi = _num(d["fid_ci"][0]), _num(d["fid_ci"][1])
        acc = d.get("class_accuracy")
        acc = acc.get("value") if isinstance(acc, dict) else acc
        fid, acc = _num(fid), _num(acc)
        if step is None or (fid is None and acc is None):
            notes.append(f"{rel}: no checkpoint_step or no fid / class_accuracy value; skipped")
            continue
        sampler, steps, cfg = d.get("sampler", "?"), d.get("steps", "?"), d.get("cfg_scale", "?")
        setting = f"{sampler}, {steps} steps, cfg {cfg}" + "".join(f", {label}" for _, label in image_settings(d))
        out.append({"file": rel, "step": int(step), "sampler": sampler, "steps": steps, "cfg_scale": cfg,
                    "setting": setting, "fid": fid, "fid_lo": lo, "fid_hi": hi,
                    "n": n if isinstance(n, int) else None, "acc": acc})
    return out, notes


def _choose(ckpts: list[Path], k: int) -> list[Path]:
    """At most k checkpoints, evenly spaced, always the first and the last."""
    if len(ckpts) <= k:
        return ckpts
    idx = sorted({int(round(v)) for v in np.linspace(0, len(ckpts) - 1, k)})
    return [ckpts[i] for i in idx]


def _rel(path: Path, base: Path) -> str:
    """A relative URL from the page's folder to `path`."""
    return urllib.parse.quote(Path(os.path.relpath(path, base)).as_posix())


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Figures that need the model.
# ---------------------------------------------------------------------------------------------


def _plot_checkpoint_rows(rows: list[tuple[int, np.ndarray]], labels: list[int], class_names: list[str],
                          out: Path) -> Path:
    """samples.png: one row per checkpoint (oldest on top), one column per (seed, label)."""
    from matplotlib.figure import Figure

    from .grids import make_grid

    ncol = rows[0][1].shape[0]
    h, w = rows[0][1].shape[1:3]
    pad = 2
    pic = make_grid(np.concatenate([r[1] for r in rows]), nrow=ncol, pad=pad)
    fig = Figure(figsize=(0.75 * ncol + 1.3, 0.75 * len(rows) + 0.8), dpi=100)
    ax = fig.subplots()
    ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))])
    ax.set_yticklabels([f"step {s}" for s, _ in rows], fontsize=8)
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(ncol)])
    if class_names:
        ax.set_xticklabels([class_names[lab] if 0 <= lab < len(class_names) else str(lab) for lab in labels[:ncol]],
                           fontsize=8)
        ax.set_xlabel("label (one fixed seed per column)", fontsize=8)
    else:  # unconditional: columns differ by seed only
        ax.set_xticklabels([f"#{j}" for j in range(ncol)], fontsize=8)
        ax.set_xlabel("image (one fixed seed per column)", fontsize=8)
    ax.tick_params(length=0)
    fig.tight_layout()
    return save_figure(fig, out)


def _tsne_source(model, cfg: dict, n: int, seed: int, opts: ReportOptions) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (B, H, W, C), labels, description): held-out real images when the run's dataset is on
    this machine (never downloaded for a report), else the model's own samples."""
    from ..data import load_dataset
    from ..data.mnist import mnist_cache_path

    c, h, w = model.image_shape
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    ds = train.get("dataset")
    data = None
    try:
        if ds == "mnist" and mnist_cache_path().exists():
            data = load_dataset("mnist", split="test", image_size=h if h != 28 else None, channels=c if c != 1 else None)
        elif isinstance(ds, str) and ds and Path(ds).is_dir():
            data = load_dataset(ds, image_size=h, channels=c)
    except DitkitError:
        data = None
    if data is not None and len(data) >= 5 and data.image_shape == (c, h, w):
        idx = np.random.default_rng(seed).permutation(len(data))[:n]
        imgs = data.images[idx].permute(0, 2, 3, 1).numpy()
        return imgs, data.labels[idx].numpy(), f"{len(idx)} held-out images of {data.name}, coloured by their true label"
    from ..sampling import generate

    res = generate(model, num=n, labels=None, seed=seed + 1, batch_size=250, sampler=opts.sampler, steps=opts.steps,
                   cfg_scale=_cfg_scale(model, cfg, opts))
    what = "coloured by the label they were drawn for" if model.num_classes else "unconditional: one colour"
    return res["images"], np.maximum(res["labels"], 0), f"{n} generated images (the dataset is not on this machine), {what}"


def _cfg_scale(model, cfg: dict, opts: ReportOptions) -> float:
    if model.num_classes == 0:
        return 1.0
    if opts.cfg_scale is not None:
        return float(opts.cfg_scale)
    v = (cfg.get("train") or {}).get("sample_cfg_scale")
    return float(v) if isinstance(v, (int, float)) else 2.0


# ---------------------------------------------------------------------------------------------
# HTML.
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:19px;margin:34px 0 8px;border-bottom:2px solid #d8dde3;padding-bottom:4px}
.sub{color:#5a6472;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:18px;color:#174ea6} .card span{font-size:12px;color:#5a6472}
.notes{background:#fff8e1;border:1px solid #f0d58c;border-radius:8px;padding:8px 16px}
.notes li{margin:3px 0}
figure{margin:10px 0;background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:10px;
  display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block} figcaption{font-size:13px;color:#5a6472;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #dfe3e8;padding:4px 8px;text-align:left}
th{background:#eef1f5} code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:10px;overflow:auto;max-height:520px}
.missing{color:#8a5a00}
figure.thumb{width:250px;margin-right:8px;vertical-align:top}
"""


class _Page:
    def __init__(self, base: Path):
        self.base = base
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def h2(self, title: str, anchor: str) -> None:
        self.add(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def p(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.add(f"<p{attr}>{html.escape(text)}</p>")

    def figure(self, path: Path, caption: str, alt: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.add(f'<figure{attr}><img src="{_rel(path, self.base)}" alt="{html.escape(alt)}">'
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def missing(self, text: str) -> None:
        self.p(text, "missing")


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in items) + "</div>"


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def build_report(run: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                 options: Optional[ReportOptions] = None, log: Optional[Callable[[str], None]] = None) -> Report:
    """Write `report.html` (default RUN/report.html) and its PNGs (next to it, in report_files/).

    Raises DitkitError only when there is nothing to report on (no such folder, or a folder with none of
    config.json, metrics.jsonl, checkpoints/); every other gap becomes a note in the page and in
    `Report.notes`. `log` receives one line per finished section (progress).
    """
    b = _Build.open(Path(run), out, (options or ReportOptions()).validate(), log or (lambda s: None))
    _read_config(b)
    for name, section in (("curves", _curves), ("samples", _samples), ("trajectory", _trajectory),
                          ("attention", _attention), ("tsne", _tsne), ("eval", _evaluations)):
        section(b)
        b.done(name)
    _write_page(b)
    b.done("page")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in b.rep.seconds.items())
    b.page.add(f'<p class="sub" style="margin-top:30px">Built in {b.rep.total_seconds:.1f} s ({html.escape(timing)}).</p>')
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>ditkit report: {html.escape(b.run.resolve().name)}</title>"
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<style>{_CSS}</style></head><body><main>\n" + "\n".join(b.page.parts) + "\n</main></body></html>\n")
    atomic_write_bytes(b.rep.path, doc.encode("utf-8"))
    return b.rep


@dataclass
class _Build:
    """One report being built: what the run holds, what each section made, and the page so far."""

    run: Path
    opts: ReportOptions
    files: Path  # report_files/
    rep: Report
    page: _Page
    has: dict[str, bool]  # which of config.json, metrics.jsonl, checkpoints/, samples/, eval/ exist
    log: Callable[[str], None]
    cfg: dict[str, Any] = field(default_factory=dict)
    recs: list[dict] = field(default_factory=list)
    ckpts: list[Path] = field(default_factory=list)
    model: Any = None  # the newest loadable checkpoint (ditkit.runs.LoadedModel): the later sections' model
    rows: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (step, uint8 (N, H, W, C)) per checkpoint
    labels: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    cfg_scale: float = 1.0
    evals: list[dict] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)  # a section's caption, or why it is empty
    t_section: float = field(default_factory=time.perf_counter)

    @property
    def notes(self) -> list[str]:
        return self.rep.notes

    @classmethod
    def open(cls, run: Path, out, opts: ReportOptions, log: Callable[[str], None]) -> "_Build":
        """Check that `run` is a run folder and `out` an .html file; clear the figures of an earlier build."""
        if not run.exists():
            raise DitkitError(f"{run}: no such folder (give a run folder made by `ditkit train`)")
        if not run.is_dir():
            raise DitkitError(f"{run}: not a folder (give a run folder made by `ditkit train`)")
        has = {name: (run / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints", "samples", "eval")}
        if not (has["config.json"] or has["metrics.jsonl"] or has["checkpoints"]):
            listing = sorted(p.name for p in run.iterdir())[:12]
            raise DitkitError(f"{run}: not a ditkit run folder: none of config.json, metrics.jsonl, checkpoints/ is "
                              f"there (it holds: {', '.join(listing) if listing else 'nothing'})")
        out = Path(out) if out is not None else run / "report.html"
        if out.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--out {out}: the report file must end in .html")
        files = out.parent / REPORT_FILES
        files.mkdir(parents=True, exist_ok=True)
        for stale in FIGURES:  # a figure this build cannot make must not linger from an earlier build
            (files / f"{stale}.png").unlink(missing_ok=True)
        return cls(run, opts, files, Report(out), _Page(out.parent), has, log)

    def done(self, section: str) -> None:
        now = time.perf_counter()
        self.rep.seconds[section] = now - self.t_section
        self.t_section = now
        self.log(f"{section}: {self.rep.seconds[section]:.1f} s")

    @property
    def family(self) -> str:
        """The run's model family (config.json "family"; runs from before families were DiTs)."""
        family = self.cfg.get("family", "dit")
        return family if isinstance(family, str) else "?"


# ---------------------------------------------------------------------------------------------
# Sections: each reads what it needs from the run, makes its figure, or says why not.
# ---------------------------------------------------------------------------------------------


def _read_config(b: _Build) -> None:
    if not b.has["config.json"]:
        b.notes.append("config.json is missing: the model cannot be rebuilt, so samples, trajectory, attention maps "
                       "and t-SNE are skipped")
        return
    try:
        b.cfg = read_run_config(b.run)  # the one validated reading of a run folder (ditkit.runs)
    except DitkitError as e:
        b.notes.append(f"config.json is unusable ({str(e)[:160]}): the model cannot be rebuilt, so samples, "
                       "trajectory, attention maps and t-SNE are skipped")


def _curves(b: _Build) -> None:
    """Training curves from metrics.jsonl."""
    from .plots import plot_curves, read_metrics_checked

    b.recs, bad_lines = read_metrics_checked(b.run)
    if not b.has["metrics.jsonl"]:
        b.notes.append("metrics.jsonl is missing: no training curves")
    elif bad_lines:
        b.notes.append(f"metrics.jsonl: {bad_lines} unreadable line(s) skipped (a run killed mid-write?); "
                       f"{len(b.recs)} records used")
    elif not b.recs:
        b.notes.append("metrics.jsonl is empty: no training curves (the run logged nothing yet)")
    curves_png, curve_missing = plot_curves(b.recs, b.files / "curves.png") if b.recs else (None, [])
    if curves_png:
        b.rep.figures["curves"] = curves_png
        if curve_missing:
            b.notes.append(f"metrics.jsonl has no {', '.join(curve_missing)}: those curves are left out")


def _samples(b: _Build) -> None:
    """A grid of samples, one row per checkpoint (fixed seeds and labels); the newest loadable checkpoint
    becomes `b.model` for the sections after it."""
    b.ckpts = list_checkpoints(b.run)
    if b.has["checkpoints"] and not b.ckpts:
        b.notes.append("checkpoints/ holds no complete checkpoint (a folder with state.json): no samples, trajectory, "
                       "attention maps or t-SNE")
    elif not b.has["checkpoints"]:
        b.notes.append("the run has no checkpoints/ folder yet: no samples, trajectory, attention maps or t-SNE")
    chosen = _choose(b.ckpts, b.opts.max_checkpoints) if b.cfg else []
    if len(chosen) < len(b.ckpts) and b.cfg:
        b.notes.append(f"{len(b.ckpts)} checkpoints: the sample grid shows {len(chosen)} of them, evenly spaced "
                       f"(raise --max-checkpoints to see more)")
    if not chosen:
        return
    from ..sampling import generate, load_model, parse_labels, validate_sampling

    opts = b.opts
    for ck in chosen:
        try:
            m = load_model(ck, weights=opts.weights, device=opts.device)
        except DitkitError as e:
            b.notes.append(f"checkpoint {ck.name}: cannot be loaded ({e}); its row is left out")
            continue
        if not b.labels:
            own = getattr(m.objective, "default_sampling", None)  # a family with a sampler of its own (maskgit)
            if own and opts.sampler == ReportOptions.sampler:
                opts = b.opts = replace(opts, sampler=own["sampler"])
            b.cfg_scale = _cfg_scale(m, b.cfg, opts)
            validate_sampling(m, sampler=opts.sampler, steps=opts.steps, cfg_scale=b.cfg_scale)  # a bad flag: stop here
            b.labels = parse_labels(None, opts.num_per_ckpt, m.num_classes)
            b.seeds = image_seeds(opts.seed, opts.num_per_ckpt)
        prompts = _prompts(m, b.cfg, opts.num_per_ckpt)
        if prompts == []:
            b.notes.append("a text model trained on a caption file: the report has no prompts to draw it with; "
                           "sample it with `ditkit sample --prompt TEXT`")
            return
        res = generate(m, num=opts.num_per_ckpt, labels=b.labels if m.num_classes else None, prompts=prompts,
                       seed=opts.seed, batch_size=opts.num_per_ckpt, sampler=opts.sampler, steps=opts.steps,
                       cfg_scale=b.cfg_scale)
        b.rows.append((m.step, res["images"]))
        b.model = m  # the newest loaded checkpoint serves the sections below
    if b.rows:
        class_names = b.model.class_names if b.model.num_classes else []
        b.rep.figures["samples"] = _plot_checkpoint_rows(b.rows, b.labels, class_names, b.files / "samples.png")


def _prompts(model, cfg: dict, n: int) -> Optional[list[str]]:
    """What a text model's sample row draws: for MNIST captions, one held-out prompt per digit 0, 1, 2, ...
    (captions the model never trained on); [] for a caption file (no prompt the report could know); None
    for a class or unconditional model."""
    if getattr(model, "text_encoder", None) is None:
        return None
    if (cfg.get("data") or {}).get("captions") != "mnist":
        return []
    from ..text.captions import HELD_OUT_TEMPLATES, compose

    return [compose(HELD_OUT_TEMPLATES[0], i % 10, word=False) for i in range(n)]


def _trajectory(b: _Build) -> None:
    """x_t and the predicted x0 along the sampler's steps, for one image of the newest row."""
    if b.model is None:
        return
    from .trajectory import plot_trajectory, record_trajectory

    opts = b.opts
    try:
        traj = record_trajectory(b.model, [b.labels[opts.image]], [b.seeds[opts.image]], sampler=opts.sampler,
                                 steps=opts.steps, cfg_scale=b.cfg_scale, at=opts.traj_steps)
    except UsageError as e:
        b.notes.append(f"trajectory skipped: {e}")
        return
    b.rep.figures["trajectory"] = plot_trajectory(traj, b.files / "trajectory.png",
                                                  b.model.class_names if b.model.num_classes else None)


def _not_for_this_model(b: _Build, what: str) -> Optional[str]:
    """Why `what` (a figure of a DiT's internals: attention maps, features) does not apply to the run's
    model, or None when it does."""
    if b.family != "dit" or not hasattr(b.model.net, "blocks"):
        return (f"{what} do not apply to this model (family {b.family!r}): they read a Diffusion Transformer's "
                "blocks and tokens")
    return None


def _attention(b: _Build) -> None:
    """Where one query patch attends, in the chosen layer and head, then in every layer and head."""
    if b.model is None:
        return
    if getattr(b.model, "text_encoder", None) is not None:
        _word_attention(b)
        return
    why_not = _not_for_this_model(b, "Attention maps")
    if why_not:
        b.captions["attention"] = why_not
        return
    from .attention import (attention_for_image, check_layer_head, default_query, describe_attention,
                            plot_attention, plot_attention_layers)

    opts, model = b.opts, b.model
    layer = len(model.net.blocks) - 1 if opts.layer is None else opts.layer
    try:
        check_layer_head(model.net, layer, opts.head)
        res_a = attention_for_image(model, b.rows[-1][1][opts.image], b.labels[opts.image], sigma=opts.attn_sigma,
                                    seed=opts.seed)
        query = default_query(res_a.image, res_a.grid) if opts.query is None else opts.query
        if not 0 <= query < res_a.grid ** 2:
            raise DitkitError(f"query patch {query} does not exist: the image has {res_a.grid ** 2} patches "
                              f"(0-{res_a.grid ** 2 - 1}, row-major on a {res_a.grid}x{res_a.grid} grid)")
    except DitkitError as e:
        b.notes.append(f"attention maps skipped: {e}")
        b.captions["attention"] = f"Skipped: {e}"
        return
    b.rep.figures["attention"] = plot_attention(res_a, layer, opts.head, query, b.files / "attention.png")
    b.rep.figures["attention_layers"] = plot_attention_layers(res_a, query, b.files / "attention_layers.png")
    label = model.class_names[b.labels[opts.image]] if model.num_classes else "-"
    b.captions["attention"] = (
        f"image {opts.image} of the step-{model.step} row (label {label}), noised to sigma={opts.attn_sigma:g}; "
        f"layer {layer}, head {opts.head}; query patch {query}. The model has {describe_attention(model.net)}. "
        "Top row: where the query patch (cyan) attends; bottom row: the mean over all queries. Each map has its "
        f"own colour scale; its peak is written below it (a uniform map peaks at 1/{res_a.grid ** 2} = "
        f"{1 / res_a.grid ** 2:.2f}).")


WORD_ATTENTION_PROMPTS = ("a bold seven", "a thin two, slanted left", "show me a small zero", "a picture of a 4")


def _word_attention(b: _Build) -> None:
    """A text model's attention section: which image patches read each word, for a few prompts."""
    from .word_attention import plot_word_attention, word_attention

    prompts = list(WORD_ATTENTION_PROMPTS) if (b.cfg.get("data") or {}).get("captions") == "mnist" \
        else ["a picture"]
    try:
        results = [word_attention(b.model, p, seed=b.opts.seed, sigma=b.opts.attn_sigma, steps=b.opts.steps)
                   for p in prompts]
    except DitkitError as e:
        b.notes.append(f"word attention skipped: {e}")
        b.captions["attention"] = f"Skipped: {e}"
        return
    b.rep.figures["attention"] = plot_word_attention(results, prompts, b.files / "attention.png")
    b.captions["attention"] = (
        f"Text to image: for each prompt, the image drawn (step {b.model.step}), then, for each word, which image "
        f"patches attend to it in the joint attention (mean over blocks and heads, at sigma={b.opts.attn_sigma:g}, "
        "renormalised over the prompt's words).")


def _tsne(b: _Build) -> None:
    """A t-SNE of the network's features of held-out (or generated) images, coloured by label."""
    if b.model is None:
        return
    if not b.opts.tsne:
        b.captions["tsne"] = "Skipped (--no-tsne)."
        return
    why_not = _not_for_this_model(b, "Feature t-SNE plots")
    if why_not:
        b.captions["tsne"] = why_not
        return
    from .embeddings import image_features, plot_tsne, tsne_2d

    opts, model = b.opts, b.model
    imgs, labs, source = _tsne_source(model, b.cfg, opts.tsne_points, opts.seed, opts)
    feats = image_features(model, imgs, opts.tsne_features, sigma=opts.attn_sigma, seed=opts.seed)
    pts = tsne_2d(feats, seed=opts.seed)
    what = ("pooled final features (tokens before final_layer)" if opts.tsne_features == "final"
            else "patch embeddings (x_embedder output)")
    b.rep.figures["tsne"] = plot_tsne(pts, labs, b.files / "tsne.png", title=f"t-SNE of {what}, step {model.step}",
                                      class_names=model.class_names or None)
    b.captions["tsne"] = (f"{source}. Features: {what}, with the null condition at sigma={opts.attn_sigma:g}, "
                          f"so clusters come from the pixels, not from the label embedding.")


def _evaluations(b: _Build) -> None:
    """FID and class accuracy across checkpoints, from RUN/eval/*.json."""
    from .plots import plot_eval

    b.evals, eval_notes = read_eval_results(b.run)
    b.notes.extend(eval_notes)
    if b.evals:
        p = plot_eval(b.evals, b.files / "eval.png")
        if p:
            b.rep.figures["eval"] = p


def _bench_plots(b: _Build) -> list[tuple[Path, str]]:
    """(figure, caption) of the repository's sampler benchmark plot (copied: the page stays whole when the
    run folder moves) and of RUN/bench/*.png."""
    bench: list[tuple[Path, str]] = []
    repo_plot = _repo_root() / BENCH_PLOT
    if repo_plot.exists():
        dst = b.files / "bench_samplers_fid_vs_nfe.png"
        shutil.copyfile(repo_plot, dst)
        bench.append((dst, f"sampler benchmark (repository {BENCH_PLOT.as_posix()})"))
    for p in sorted((b.run / "bench").glob("*.png")) if (b.run / "bench").is_dir() else []:
        bench.append((p, f"{p.relative_to(b.run).as_posix()}"))
    return bench


# ---------------------------------------------------------------------------------------------
# The page: key figures, then one part per section.
# ---------------------------------------------------------------------------------------------


def _write_page(b: _Build) -> None:
    name = b.cfg.get("model_name") or (b.cfg.get("model") or {}).get("name") or "unknown model"
    b.page.add(f"<h1>ditkit report: {html.escape(b.run.resolve().name)}</h1>")
    b.page.p(f"{b.run} · {name} · built {time.strftime('%Y-%m-%d %H:%M')}", "sub")
    b.page.add(_cards(_key_figures(b, str(name))))
    if b.notes:
        b.page.h2("What this run holds, and what it does not", "notes")
        b.page.add('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in b.notes) + "</ul>")
    for part in (_page_curves, _page_samples, _page_eval, _page_trajectory, _page_attention, _page_tsne,
                 _page_bench, _page_config):
        part(b)


def _key_figures(b: _Build, name: str) -> list[tuple[str, str]]:
    """The cards at the top: (what, value)."""
    from .plots import tail_mean

    obj, data = b.cfg.get("objective") or {}, b.cfg.get("data") or {}
    last = b.recs[-1] if b.recs else {}
    ckpt_steps = [_step_of(c.name) for c in b.ckpts]
    trained = max([s for s in ckpt_steps if s is not None] + ([int(last["step"])] if last else []), default=None)
    cards: list[tuple[str, str]] = [("model", name)]
    if b.family != "dit":
        cards.append(("family", b.family))
    if b.model is not None:
        cards.append(("parameters", f"{sum(p.numel() for p in b.model.net.parameters()) / 1e6:.2f} M"))
    if obj:
        cards.append(("objective", f"{obj.get('name', '?')} / {obj.get('prediction', '?')}"
                                   + (" / mean-centred" if obj.get("data_mean") is not None else "")))
    if data:
        cards.append(("data", f"{data.get('name', '?')} {'x'.join(str(v) for v in data.get('shape', []))}"))
    if trained is not None:
        cards.append(("steps trained", f"{trained:,}"))
    if isinstance(last.get("epoch"), (int, float)):
        cards.append(("epochs", f"{last['epoch']:.2f}"))
    if isinstance(last.get("elapsed_s"), (int, float)):
        cards.append(("training time", _fmt_seconds(float(last["elapsed_s"]))))
    losses = [r.get("loss_avg", r.get("loss")) for r in b.recs]
    losses = [v for v in losses if isinstance(v, (int, float)) and np.isfinite(v)]
    if losses:
        n, value = tail_mean(np.asarray(losses, dtype=float))
        cards.append((f"final loss (mean of the last {n} logged)", f"{value:.4f}"))
    ips = [r["img_per_s"] for r in b.recs if isinstance(r.get("img_per_s"), (int, float))]
    if ips:
        cards.append(("median img/s", f"{np.median(ips):.0f}"))
    cards.append(("checkpoints", str(len(b.ckpts))))
    fids = [e for e in b.evals if e["fid"] is not None]
    if fids:
        best = min(fids, key=lambda e: e["fid"])
        cards.append((f"best FID (step {best['step']}, {best['setting']})", f"{best['fid']:.2f}"))
    return cards


def _page_curves(b: _Build) -> None:
    b.page.h2("Training curves", "curves")
    if "curves" in b.rep.figures:
        b.page.figure(b.rep.figures["curves"], "Loss, gradient norm (before clipping), learning rate and throughput "
                      "against step; faint: as logged, bold: smoothed by a local linear fit over a centred window "
                      "(it follows the data, without an average's lag).", "training curves")
    else:
        b.page.missing("No metrics logged (metrics.jsonl missing or empty).")


def _page_samples(b: _Build) -> None:
    opts = b.opts
    b.page.h2("Samples across checkpoints", "samples")
    if "samples" in b.rep.figures:
        b.page.figure(b.rep.figures["samples"], f"{opts.weights.upper()} weights of each checkpoint (rows, oldest on "
                      f"top); the same seed and label in each column, so rows compare. {opts.sampler}, {opts.steps} "
                      f"steps, guidance scale {b.cfg_scale:g}.", "samples of every checkpoint")
    else:
        b.page.missing("No samples: " + ("no loadable checkpoint." if b.cfg else "config.json is missing or unreadable."))
    grids = sorted((b.run / "samples").glob("step_*.png")) if b.has["samples"] else []
    if grids:
        b.page.add("<p>Grids saved during training (newest last):</p>")
        for g in grids[-4:]:
            b.page.figure(g, f"{g.name} (training-time sampler settings)", g.name, cls="thumb")


def _eval_row(step: Optional[int], e: dict, gone: bool = False) -> str:
    has_ci = e["fid_lo"] is not None and e["fid_hi"] is not None
    fid = "-" if e["fid"] is None else f"{e['fid']:.2f}" + (f" [{e['fid_lo']:.2f}, {e['fid_hi']:.2f}]" if has_ci else "")
    acc = "-" if e["acc"] is None else f"{100 * e['acc']:.1f} %"
    source = html.escape(e["file"]) + (" (checkpoint no longer on disk)" if gone else "")
    return f"<tr><td>{step}</td><td>{html.escape(e['setting'])}</td><td>{fid}</td><td>{acc}</td><td>{source}</td></tr>"


def _page_eval(b: _Build) -> None:
    b.page.h2("Evaluation across checkpoints", "eval")
    if "eval" in b.rep.figures:
        b.page.figure(b.rep.figures["eval"], "FID with its confidence interval and class accuracy, per sampling "
                      "setting.", "FID and class accuracy against step")
    by_step: dict[int, list[dict]] = {}
    for e in b.evals:
        by_step.setdefault(e["step"], []).append(e)
    rows_html = []
    for ck in b.ckpts:
        st = _step_of(ck.name)
        if st in by_step:
            rows_html += [_eval_row(st, e) for e in by_step[st]]
        else:
            cmd = EVAL_HINT.format(ckpt=shlex.quote(str(ck)))
            rows_html.append(f'<tr><td>{st}</td><td colspan="4" class="missing">not evaluated: '
                             f"<code>{html.escape(cmd)}</code></td></tr>")
    for st in sorted(set(by_step) - {_step_of(c.name) for c in b.ckpts}):  # results of checkpoints since deleted
        rows_html += [_eval_row(st, e, gone=True) for e in by_step[st]]
    if rows_html:
        b.page.add("<table><tr><th>step</th><th>setting</th><th>FID [95% CI]</th><th>class accuracy</th>"
                   "<th>source</th></tr>" + "".join(rows_html) + "</table>")
    if not b.evals:
        example = EVAL_HINT.format(ckpt=shlex.quote(str(b.ckpts[-1] if b.ckpts else b.run / "checkpoints" / "step_X")))
        b.page.add(f'<p class="missing">No evaluation results in {html.escape(str(b.run / "eval"))}. '
                   f"Produce them per checkpoint with <code>{html.escape(example)}</code>, then rebuild the report.</p>")


def _page_trajectory(b: _Build) -> None:
    b.page.h2("Denoising trajectory", "trajectory")
    if "trajectory" in b.rep.figures:
        b.page.figure(b.rep.figures["trajectory"], f"Image {b.opts.image} of the newest row (step {b.model.step}): "
                      "the noisy state x_t and the model's predicted clean image x0 at the chosen sampler steps, then "
                      "the output. `ditkit sample --trajectory FILE.png|FILE.gif` writes the same for any seed and "
                      "label.", "denoising trajectory")
    else:
        b.page.missing("No trajectory: no loadable checkpoint.")


def _page_attention(b: _Build) -> None:
    b.page.h2("Attention maps", "attention")
    caption = b.captions.get("attention")
    if "attention" not in b.rep.figures:
        b.page.missing(caption or "No attention maps: no loadable checkpoint.")
        return
    b.page.figure(b.rep.figures["attention"], caption or "", "attention maps")
    if "attention_layers" in b.rep.figures:
        b.page.figure(b.rep.figures["attention_layers"], "Every layer (rows) and head (columns, then the head mean), "
                      "for the same query patch: how the attention pattern changes with depth.",
                      "attention by layer and head")


def _page_tsne(b: _Build) -> None:
    b.page.h2("Feature t-SNE", "tsne")
    caption = b.captions.get("tsne")
    if "tsne" in b.rep.figures:
        b.page.figure(b.rep.figures["tsne"], caption or "", "t-SNE of features")
    else:
        b.page.missing(caption or "No t-SNE: no loadable checkpoint.")


def _page_bench(b: _Build) -> None:
    b.page.h2("Sampler benchmark", "bench")
    bench = _bench_plots(b)
    for p, cap in bench:
        b.page.figure(p, cap, cap)
    if not bench:
        b.page.missing(f"No sampler benchmark plot ({BENCH_PLOT.as_posix()} in the repository, or "
                       f"{b.run / 'bench'}/*.png).")


def _page_config(b: _Build) -> None:
    b.page.h2("Configuration", "config")
    if b.cfg:
        b.page.add(f"<details><summary>config.json</summary><pre>"
                   f"{html.escape(json.dumps(b.cfg, indent=2, sort_keys=True))}</pre></details>")
    else:
        b.page.missing("config.json is missing or unreadable.")
