"""A run chooses its own sampling setting (`ditkit tune RUN`, and at the end of `ditkit train`).

The best way to sample a model depends on the model: after a long run on a fast host, autoguidance by the
run's early weights with rejection gives the best digits; after a short run on a slow, busy one, the same
setting can be the worst of all, and plain classifier-free guidance wins. So instead of one fixed setting,
the run evaluates a small, principled set of candidates on itself — a few hundred images each, the same
labels and seeds for every candidate, ditkit's own classifier for FID and class accuracy — and keeps the
winner in RUN/sampling.json, which `ditkit sample`, `eval`, `serve` and `ditkit.load()` then use when no
sampling flag is given.

The rule (accuracy first, then FID, then cost): among the candidates whose class accuracy is within
`ACCURACY_SLACK` of the best, the lowest FID ratio to the real-data floor; a cheaper candidate within
`FID_SLACK` of that FID wins the tie. The whole evaluation stays inside a time budget (10% of the run's
training time by default): the number of images per candidate is what the budget buys, measured by a
probe, and the costliest candidates are dropped first when even `MIN_IMAGES` each do not fit.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import DitkitError, UsageError
from .settings import SamplingSettings, SettingsError

log = logging.getLogger(__name__)

INF = math.inf
# The candidates: the settings measured best after long runs (autoguidance by the run's early weights at
# sigma >= 0.6, with and without rejection), light CFG with rejection (best after 30 minutes with AdamW), the
# stochastic solver with CFG 1.35 (robust after short runs, a third of the cost), and no guidance at all.
CANDIDATES: tuple[tuple[str, SamplingSettings], ...] = (
    ("autoguidance 2 + rejection", SamplingSettings(sampler="dpm++2m", steps=20, autoguidance=2.0,
                                                    guidance_interval=(0.6, INF), reject=0.08)),
    ("autoguidance 2", SamplingSettings(sampler="dpm++2m", steps=20, autoguidance=2.0, guidance_interval=(0.6, INF))),
    ("cfg 1.05 + rejection", SamplingSettings(sampler="dpm++2m-sde", steps=20, cfg_scale=1.05, reject=0.08)),
    ("cfg 1.35", SamplingSettings(sampler="dpm++2m-sde", steps=20, cfg_scale=1.35)),
    ("no guidance", SamplingSettings(sampler="dpm++2m-sde", steps=20)),
)
ACCURACY_SLACK = 0.005  # candidates within half a point of the best accuracy compete on FID
FID_SLACK = 0.05  # ... and one within 5% of the best FID ratio that costs less per image wins
MIN_IMAGES, MAX_IMAGES = 200, 1000
PROBE_IMAGES = 16  # images per candidate in the cost probe, one batch (a batch of 4 overstates the cost per image)
BUDGET_FRACTION = 0.10  # of the run's training time
MIN_BUDGET_S = 60.0


@dataclass
class Measured:
    name: str
    settings: SamplingSettings
    seconds_per_image: float
    fid_ratio: float = math.nan
    accuracy: float = math.nan

    def figures(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "seconds_per_image": round(self.seconds_per_image, 5),
                "fid_ratio": round(self.fid_ratio, 4), "accuracy": round(self.accuracy, 5)}


def applicable(model: Any) -> list[tuple[str, SamplingSettings]]:
    """The candidates this model can use (autoguidance needs its weak model, CFG and rejection a class model)."""
    out = []
    for name, st in CANDIDATES:
        try:
            st.validate(model)
        except SettingsError:
            continue
        out.append((name, st))
    return out


def choose(measured: list[Measured]) -> Measured:
    """The rule of the module docstring: accuracy first, then FID ratio, then cost."""
    if not measured:
        raise DitkitError("tune: no candidate setting was measured")
    best_acc = max(m.accuracy for m in measured)
    eligible = [m for m in measured if m.accuracy >= best_acc - ACCURACY_SLACK]
    best_fid = min(m.fid_ratio for m in eligible)
    close = [m for m in eligible if m.fid_ratio <= best_fid * (1 + FID_SLACK)]
    return min(close, key=lambda m: (m.seconds_per_image, m.fid_ratio))


def training_seconds(model: Any) -> Optional[float]:
    """The run's training time so far (its last checkpoint's clock), or None where it did not record one."""
    from .runs import read_state

    if model.checkpoint is None:
        return None
    value = read_state(Path(model.checkpoint)).get("elapsed_s")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _probe(model: Any, st: SamplingSettings, seed: int) -> float:
    """Seconds per image of `st` (rejection's redraws included), from PROBE_IMAGES images."""
    from .sampling import generate

    t0 = time.perf_counter()
    generate(model, st, num=PROBE_IMAGES, labels="all", seed=seed + 7919, batch_size=PROBE_IMAGES)
    return (time.perf_counter() - t0) / PROBE_IMAGES


def plan_images(costs: dict[str, float], budget_s: float, probe_s: float) -> tuple[int, list[str]]:
    """(images per candidate, the candidates kept): as many images as the budget left after the probe buys for
    every candidate, at most MAX_IMAGES; the costliest candidates dropped while MIN_IMAGES each do not fit."""
    kept = sorted(costs, key=costs.get)
    left = budget_s - probe_s
    while kept:
        per_image = sum(costs[k] for k in kept) * 1.15  # the classifier and the floor: ~15% on top
        n = int(left / per_image) if per_image > 0 else MAX_IMAGES
        if n >= MIN_IMAGES or len(kept) == 1:
            return max(min(n, MAX_IMAGES), MIN_IMAGES), kept
        kept.pop()
    return MIN_IMAGES, kept


def not_judged(config: dict[str, Any]) -> Optional[str]:
    """Why ditkit's judge (its MNIST classifier and FID features) cannot rate this run's images, or None: it
    reads the ten MNIST digits, so a run on another image set (a user's folder of 28x28 letters, say) is not
    rated by it, whatever its shape."""
    data = config.get("data", {})
    if data.get("shape", [1, 28, 28]) != [1, 28, 28]:
        return f"ditkit's judge reads MNIST digits (1x28x28); this run's data is {data['shape']}"
    if not str(data.get("name", "mnist")).startswith("mnist") or \
            data.get("class_names", [str(i) for i in range(10)]) != [str(i) for i in range(10)]:
        return f"ditkit's judge reads MNIST digits; this run was trained on {data.get('name', 'another set')!r}"
    return None


def tune_model(model: Any, *, budget_s: Optional[float] = None, num: Optional[int] = None, seed: int = 10_000,
               log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Evaluate the applicable candidates on the model and return the record `write_tuned_setting` keeps:
    {"name", "settings", "figures" (per candidate), "n", "step", "budget_s", "seconds", "rule"}.
    budget_s: the time allowed (default 10% of the run's training time, at least a minute); num: images per
    candidate (default: what the budget buys, MIN_IMAGES to MAX_IMAGES). Seeds start at `seed`, away from
    the evaluations' (0), so the choice is not made on the images it is then judged by."""
    from .evaluate import evaluate_model

    why = not_judged(model.config)
    if why:
        raise UsageError(f"tune: {why}: pass sampling flags to `ditkit sample` instead")
    if num is not None and num < MIN_IMAGES // 4:
        raise UsageError(f"--num {num}: at least {MIN_IMAGES // 4} images per candidate (FID means little below)")
    cands = applicable(model)
    if not cands:
        raise DitkitError("tune: none of the candidate settings applies to this model")
    t0 = time.perf_counter()
    if budget_s is None:
        trained = training_seconds(model)
        budget_s = max(MIN_BUDGET_S, BUDGET_FRACTION * trained) if trained else 5 * MIN_BUDGET_S
    costs = {name: _probe(model, st, seed) for name, st in cands}
    probe_s = time.perf_counter() - t0
    if num is None:
        num, kept = plan_images(costs, budget_s, probe_s)
    else:
        kept = list(costs)
    dropped = [name for name, _ in cands if name not in kept]
    if dropped:
        log_fn(f"tune: the budget of {budget_s:.0f} s leaves out {', '.join(dropped)} (the costliest)")
    measured = []
    for name, st in cands:
        if name not in kept:
            continue
        res, _ = evaluate_model(model, st, num=num, seed=seed, labels="prior", n_boot=20)
        acc = res["class_accuracy"]["value"] if res.get("class_accuracy") else 1.0
        m = Measured(name, st, costs[name], float(res["fid_ratio"]), float(acc))
        measured.append(m)
        log_fn(f"tune: {name:<28} FID {m.fid_ratio:.2f}x the floor, {100 * m.accuracy:.2f}% read as asked, "
               f"{1000 * m.seconds_per_image:.0f} ms/image (n = {num})")
    best = choose(measured)
    return {"name": best.name, "settings": best.settings.to_dict(), "n": num, "step": model.step,
            "budget_s": round(budget_s, 1), "seconds": round(time.perf_counter() - t0, 1),
            "rule": f"accuracy within {100 * ACCURACY_SLACK:g} points of the best, then the lowest FID ratio; "
                    f"a cheaper candidate within {100 * FID_SLACK:g}% of it wins",
            "figures": {m.name: m.figures() for m in measured}, "dropped": dropped}


def tune_run(run: str | os.PathLike, *, budget_s: Optional[float] = None, num: Optional[int] = None,
             seed: int = 10_000, device: str = "auto", log_fn: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Load a run, tune it (`tune_model`) and keep the winner in RUN/sampling.json."""
    from .runs import load_model, write_tuned_setting

    model = load_model(run, device=device)
    if model.run_dir is None:
        raise UsageError(f"{run}: give a run folder (the tuned setting is kept in it)")
    record = tune_model(model, budget_s=budget_s, num=num, seed=seed, log_fn=log_fn)
    write_tuned_setting(model.run_dir, record)
    return record


def register(sub, parser_class) -> None:
    """`ditkit tune RUN`: the thin CLI over tune_run."""
    from .cli_args import finite_float, positive_int, seed_int

    p = sub.add_parser("tune", help="let a run choose its own sampling setting (kept in RUN/sampling.json)")
    p.add_argument("run", help="a run folder made by `ditkit train`")
    p.add_argument("--budget-minutes", type=finite_float("--budget-minutes", 0, True), default=None,
                   help=f"time allowed (default: {100 * BUDGET_FRACTION:g}%% of the run's training time, at least "
                        f"{MIN_BUDGET_S / 60:g} minute)")
    p.add_argument("--num", type=positive_int("--num"), default=None,
                   help=f"images per candidate (default: what the budget buys, {MIN_IMAGES}-{MAX_IMAGES})")
    p.add_argument("--seed", type=seed_int(), default=10_000)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    budget = None if args.budget_minutes is None else 60 * args.budget_minutes
    rec = tune_run(args.run, budget_s=budget, num=args.num, seed=args.seed, device=args.device, log_fn=print)
    fig = rec["figures"][rec["name"]]
    print(f"chosen: {rec['name']} ({SamplingSettings.from_dict(rec['settings']).describe()}): FID "
          f"{fig['fid_ratio']:.2f}x the floor at n = {rec['n']}, {100 * fig['accuracy']:.2f}% read as asked, "
          f"{1000 * fig['seconds_per_image']:.0f} ms/image; kept in {Path(args.run) / 'sampling.json'} "
          f"({rec['seconds']:.0f} s)")
    return 0
