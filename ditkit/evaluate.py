"""evaluate(): generate from a checkpoint (or read an .npz of samples), then class accuracy and FID on
the project's classifier features, with n and bootstrap intervals. The CLI, the report and the
benchmarks call this one function. Also `held_out_loss`: the training objective's loss on held-out
images, on draws every model shares (a low-noise ranking of training changes)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import DitkitError
from .utils import atomic_write_json


def load_samples(path: str | Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """`images` (uint8, N x H x W x C or N x H x W) and optional `labels` from an .npz (no pickle)."""
    p = Path(path)
    if not p.exists():
        raise DitkitError(f"--samples {p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; anything else is refused before numpy reads it
        raise DitkitError(f"--samples {p}: not an .npz archive (write one with `ditkit sample --out FILE.npz` "
                          "or numpy.savez(FILE, images=uint8 array, labels=int array))")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z:
                raise DitkitError(f"--samples {p}: no 'images' array (found: {', '.join(z.files) or 'nothing'})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (ValueError, OSError) as e:
        why = "it holds Python objects, which ditkit never unpickles" if "pickle" in str(e) else str(e)
        raise DitkitError(f"--samples {p}: not a readable .npz of arrays ({why})") from None
    return images, labels


def evaluate_samples(images: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
    from .eval.metrics import evaluate_images

    return evaluate_images(images, labels)


def image_settings(res: dict[str, Any]) -> list[tuple[str, str]]:
    """The settings of an evaluation (its result dict) beyond sampler, steps and guidance scale that change
    the images, each as (file-name tag, label for the report), in file-name order; defaults are left out."""
    out = []
    labels = res.get("labels_spec", "all")  # results written before the default became 'prior' were balanced
    if labels != "prior":
        tag = "balanced" if labels == "all" else "labels" + str(labels).replace(" ", "").replace(",", "-")
        out.append((tag, "balanced labels" if labels == "all" else f"labels {labels}"))
    if res.get("cfg_schedule", "constant") != "constant" and res.get("cfg_scale", 1) != 1:
        out.append((res["cfg_schedule"], f"{res['cfg_schedule']} schedule"))
    if res.get("autoguidance", 1) != 1:
        out.append((f"ag{res['autoguidance']:g}", f"autoguidance {res['autoguidance']}"))
    if res.get("autoguidance", 1) != 1 and res.get("guide_own") is False:  # not the run's own weak model
        run = res.get("guide_run")  # None: an early checkpoint of the same run
        name = "" if run is None else re.sub(r"[^A-Za-z0-9.-]+", "-", run) + "-"
        out.append((f"guide-{name}{res.get('guide_step', 0)}",
                    f"weak model {'' if run is None else run + ' '}step {res.get('guide_step', 0)}"))
    if res.get("guidance_interval") is not None:
        lo, hi = res["guidance_interval"]
        out.append((f"gi{lo:g}-{hi:g}", f"guidance at sigma in [{lo:g}, {hi:g}]"))
    if res.get("reject") is not None:
        out.append((f"reject{res['reject']:g}", f"rejection at margin {res['reject']:g}"))
    if res.get("spacing"):
        out.append((res["spacing"], f"{res['spacing']} grid"))
    if res.get("weights", "ema") != "ema":
        out.append(("raw", "raw weights"))
    if res.get("seed", 0) != 0:
        out.append((f"seed{res['seed']}", f"seed {res['seed']}"))
    if res.get("precision", "fp32") != "fp32":
        out.append((str(res["precision"]), str(res["precision"])))
    if res.get("compiled"):
        out.append(("compiled", "compiled"))
    if res.get("quantize", "none") != "none":
        out.append((str(res["quantize"]), str(res["quantize"]).upper()))
    opts = res.get("sampler_options")
    for k, v in sorted(opts.items() if isinstance(opts, dict) else []):
        out.append((f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}", f"{k}={v}"))
    return out


def evaluate_model(model, settings=None, *, num: int = 10000, seed: int = 0, batch_size: int = 250,
                   labels: str | Sequence[int] | None = "prior", progress=None, n_boot: Optional[int] = None,
                   **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample `num` images from a loaded model (`runs.load_model`) with `settings` (a SamplingSettings;
    `changes` override its fields) and evaluate them.

    Returns (result, samples): the result as `evaluate_checkpoint` keeps it (JSON-ready: settings, class
    accuracy, FID with its interval, floor and ratio) and `sampling.generate`'s dict with the images, for
    the benchmarks that also draw a grid. labels: `sampling.parse_labels`'s spec; 'prior' (the default) draws
    the training data's class mix, in exact counts (`sampling.stratified_labels`). n_boot: FID's bootstrap
    draws (None: the metrics' default)."""
    from .eval.metrics import evaluate_images
    from .sampling import generate, settings_of

    st = settings_of(settings, **changes)
    if model.config.get("data", {}).get("shape", [1, 28, 28]) != [1, 28, 28]:
        raise DitkitError("ditkit eval measures MNIST-shaped models (1x28x28); this run's data is "
                          f"{model.config['data']['shape']}")
    t0 = time.perf_counter()
    res = generate(model, st, num=num, labels=labels, seed=seed, batch_size=batch_size, progress=progress)
    sample_s = time.perf_counter() - t0
    ev = evaluate_images(res["images"], res["labels"] if model.num_classes else None,
                         **({} if n_boot is None else dict(n_boot=n_boot)))
    out = dict(checkpoint=str(model.checkpoint), checkpoint_step=model.step, sampler=st.sampler, steps=st.steps,
               nfe=res["nfe"], cfg_scale=st.cfg_scale, cfg_schedule=st.cfg_schedule, spacing=st.spacing, seed=seed,
               sampler_options=dict(st.options),
               labels_spec="all" if labels is None else labels if isinstance(labels, str) else "custom",
               sample_seconds=sample_s, settings=st.to_dict(), **ev)
    if st.autoguidance != 1:
        from .runs import GUIDE_DIR

        def same(a, b) -> bool:
            return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()

        g = model.guide
        run = None if model.run_dir is None else Path(model.run_dir)
        out.update(autoguidance=st.autoguidance, guide=str(g.checkpoint), guide_step=g.step,
                   guide_own=same(g.checkpoint, run and run / GUIDE_DIR),
                   guide_run=None if same(g.run_dir, run) or g.run_dir is None else Path(g.run_dir).name)
    if st.guidance_interval is not None and (st.cfg_scale != 1 or st.autoguidance != 1):
        out.update(guidance_interval=[float(v) for v in st.guidance_interval])
    if st.reject is not None:
        out.update(reject=st.reject, redraws=res["redraws"], rejected_kept=res["rejected_kept"])
    # the report reads these two keys as dicts
    out["fid"] = dict(value=ev["fid"], ci_low=ev["fid_ci"][0], ci_high=ev["fid_ci"][1], n=ev["n"])
    return out, res


def evaluate_checkpoint(ckpt: str | Path, settings=None, *, num: int = 10000, seed: int = 0, batch_size: int = 250,
                        labels: str | Sequence[int] | None = "prior", weights: str = "ema", device: str = "auto",
                        write: bool = True, progress=None, guide: Optional[str | Path] = None,
                        precision: str = "fp32", compile: bool = False, quantize: str = "none",
                        **changes: Any) -> dict[str, Any]:
    """Load a run or checkpoint, then `evaluate_model`; with `write`, keep the result as
    RUN/eval/step_S_<sampler>_<steps>_cfg<scale>[_balanced][_ramp][_ag<w>][_gi<lo>-<hi>][_reject<m>][_<spacing>][_raw][_seed<s>][_bf16]
    [_compiled][_<option><value>...]_n<num>.json for the report: every setting that changes the images
    names its own file."""
    from .runs import load_model
    from .sampling import settings_of

    st = settings_of(settings, **changes)
    model = load_model(ckpt, weights=weights, device=device, guide=guide, precision=precision, compile=compile,
                       quantize=quantize)
    out, _ = evaluate_model(model, st, num=num, seed=seed, batch_size=batch_size, labels=labels, progress=progress)
    out.update(weights=weights, precision=precision, compiled=compile, quantize=model.quantize)
    if write and model.run_dir is not None:
        tags = [tag for tag, _ in image_settings(out)]
        name = (f"step_{model.step:07d}_{out['sampler']}_{st.steps}_cfg{st.cfg_scale:g}"
                f"{''.join('_' + t for t in tags)}_n{num}.json")
        atomic_write_json(Path(model.run_dir) / "eval" / name, out)
    return out


def format_result(res: dict[str, Any]) -> str:
    fid = res["fid"] if isinstance(res["fid"], dict) else dict(value=res["fid"], ci_low=res["fid_ci"][0],
                                                               ci_high=res["fid_ci"][1])
    lines = [f"n = {res['n']}",
             f"FID = {fid['value']:.3f}  (95% CI {fid['ci_low']:.3f} – {fid['ci_high']:.3f})",
             f"FID of {res['n']} real training digits (the floor at this n) = {res['fid_floor']:.3f}; "
             f"ratio {res['fid_ratio']:.2f}x"]
    if res.get("fid_floor_same_mix") is not None:
        lines.append(f"FID of {res['n']} real training digits in the samples' class counts = "
                     f"{res['fid_floor_same_mix']:.3f}; ratio {res['fid_ratio_same_mix']:.2f}x")
    if res.get("reject") is not None:
        lines.append(f"rejection at margin {res['reject']:g}: {res['redraws']} images redrawn, "
                     f"{res['rejected_kept']} still rejected at their last draw (kept)")
    acc = res.get("class_accuracy")
    if acc:
        lines.append(f"class accuracy = {100 * acc['value']:.2f}%  (95% CI {100 * acc['ci_low']:.2f}% – "
                     f"{100 * acc['ci_high']:.2f}%, n = {acc['n']})")
        per_class = acc.get("per_class") or {}
        if per_class and acc["value"] < 1:
            weakest = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))[:3]
            lines.append("weakest digits: " + ", ".join(f"{d} {100 * a:.1f}%" for d, a in weakest))
        if acc.get("confusions"):
            lines.append("most frequent misreadings (asked -> read): " +
                         ", ".join(f"{c['asked']} -> {c['read']} ({c['count']})" for c in acc["confusions"]))
    lines.append(f"note: {res['note']}")
    return "\n".join(lines)


def held_out_loss(model, images: Any, labels: Any = None, *, repeats: int = 2, bins: int = 8, seed: int = 1234,
                  batch_size: int = 1000) -> dict[str, Any]:
    """The training objective's loss on held-out images: a loaded model's (`sampling.load_model`) mean
    loss over `repeats` draws per image of the objective's own training times and noise (a generator
    seeded with `seed`: every model is scored on the same draws, so two models' difference is paired),
    with no label dropout and the plain target. images: uint8 (N, C, H, W) like a dataset's, or float in
    the model's range; labels: (N,) or None (an unconditional model).

    A training-side change can be compared on this at a matched step or time with far less noise than
    through FID (docs/BENCHMARKS.md, the held-out loss); it does not see guidance or the sampler.
    Returns loss (the mean), its standard error over images, n, and `bins` equal-count bins of the
    training time, each with its t range and mean loss."""
    import torch

    from .condition import Condition
    from .data.dataset import to_model_range

    if repeats < 1 or bins < 1 or batch_size < 1:
        raise DitkitError(f"held_out_loss: repeats {repeats}, bins {bins} and batch_size {batch_size} must be >= 1")
    x0 = torch.as_tensor(images)
    x0 = to_model_range(x0.float()) if x0.dtype == torch.uint8 else x0.float()
    if tuple(x0.shape[1:]) != tuple(model.image_shape):
        raise DitkitError(f"held_out_loss: images of shape {tuple(x0.shape[1:])}, the model's are "
                          f"{tuple(model.image_shape)}")
    if model.num_classes and labels is None:
        raise DitkitError("held_out_loss: this model is class-conditional; give the images' labels")
    obj, net, dev = model.objective, model.net, model.device
    n, shape = x0.shape[0], tuple(x0.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    ts, per = [], []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for _ in range(repeats):
                noise = obj.sample_noise(n, shape, gen)
                ts.append(noise["t"].double())
                for i in range(0, n, batch_size):
                    sl = slice(i, min(i + batch_size, n))
                    b = sl.stop - sl.start
                    cond = (Condition.from_labels(torch.as_tensor(labels[sl]), model.num_classes)
                            if model.num_classes else Condition.none(b))
                    rows = dict(t=noise["t"][sl], eps=noise["eps"][sl], drop=torch.zeros(b, dtype=torch.bool))
                    per.append(obj.loss(net, x0[sl].to(dev), cond, noise=rows, reduce=False).cpu())
    finally:
        net.train(was_training)
    loss, t = torch.cat(per).double(), torch.cat(ts)
    out_bins = [dict(t_low=float(t[chunk].min()), t_high=float(t[chunk].max()), loss=float(loss[chunk].mean()))
                for chunk in torch.tensor_split(torch.argsort(t), bins)]
    per_image = loss.view(repeats, n).mean(0)
    return dict(loss=float(loss.mean()), stderr=float(per_image.std() / n ** 0.5), n=n, repeats=repeats,
                seed=seed, bins=out_bins)
