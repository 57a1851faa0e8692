"""The training loop: dataset -> loader -> objective.loss(net, x, cond) -> AdamW -> EMA -> checkpoints.

Bit-exact resume on CPU: all training randomness comes from one torch.Generator whose state is saved in
every checkpoint, the data order of epoch e is a permutation seeded by (seed, e), and the position in
the epoch is saved; so a resumed run draws the same batches and the same noise as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..condition import Condition
from ..data import load_dataset
from ..errors import DitkitError, UsageError
from ..models import DiTConfig, build_model, model_config
from ..objectives import DataMean, build_objective
from ..utils import atomic_write_bytes, atomic_write_json, compile_failed, first_line, pick_device, resolve_precision
from .checkpoint import clean_partial, guide_checkpoint, latest_checkpoint, load_training_state, save_checkpoint, save_guide
from .config import TrainConfig
from .distributed import DistContext
from .ema import EMA
from .optim import DEFAULT_WEIGHT_DECAY, build_optimizer

log = logging.getLogger(__name__)

GRID_SEED = 1234
PLAN_AFTER_STEPS = 30  # with only --max-minutes: plan the run after this many steps, re-plan at 2x, 4x, ...
DECAY_REPLANS = 8  # during the lr decay, re-plan each time 1/DECAY_REPLANS of the remaining steps is done,
LAST_REPLAN_STEPS = 16  # until fewer than this many remain
# --compile auto (the default) compiles a run on the CPU that is at least this long: compiling costs ~35 s
# here and then buys ~24% more steps per second, so it pays for itself after ~2.5 minutes of training.
AUTO_COMPILE_MIN_MINUTES = 3.0
AUTO_COMPILE_MIN_STEPS = 3000
# ... but not on a CPU whose widest vectors are AVX2: there a compiled step was measured no faster than an
# eager one (fp32, batch 64: 154 against 155 img/s, and 167 against 170 in a second pair), while a first
# compilation (empty inductor cache) cost ~50 s, 8% of a 10-minute run (docs/BENCHMARKS.md, round 28).
AUTO_COMPILE_SKIP_CPUS = ("AVX2",)
# --batch-size auto (the default) is 64, with lr 2.8e-3: better per CPU-minute than 32 where a 10-minute run
# makes 5,000+ steps (docs/BENCHMARKS.md, "Batch size"). A run limited by time alone first measures a
# training step here at each of these batches, and takes the first one at which its budget buys at least
# AUTO_BATCH_MIN_STEPS steps (else the last): on a host that made ~1,600 steps at 64 in 10 minutes, batch
# 32's ~2,700 were better in two pairs of two (~3.3x the FID floor against ~4.0x), and batch 16's ~4,500
# worse (5.4x; docs/BENCHMARKS.md, rounds 28-29). 3,000 lies between 1,600 (32 better) and 6,100 (64 better).
AUTO_BATCHES = (64, 32)
AUTO_BATCH_MIN_STEPS = 3000
PROBE_WARMUP, PROBE_STEPS = 2, 3  # untimed, then timed, training steps of the measurement at each batch
BASE_BATCH, BASE_LR = 64, 2.8e-3  # --lr auto: BASE_LR at BASE_BATCH, scaled by sqrt(batch / BASE_BATCH)


def lr_for_batch(batch: int) -> float:
    """--lr auto: 2.8e-3 at batch 64, scaled by the square root of the batch (~2e-3 at 32)."""
    return BASE_LR * math.sqrt(batch / BASE_BATCH)


def compile_pays_here() -> Optional[str]:
    """None where --compile auto may compile on this CPU, else why not (torch's CPU capability)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in AUTO_COMPILE_SKIP_CPUS:
        return (f"this CPU's widest vectors are {cap} (no AVX-512), where a compiled training step was measured "
                "no faster than an eager one; --compile compiles anyway")
    return None


def next_plan_step(step: int, planned: int, lr_decay: float, *, in_decay: bool) -> Optional[int]:
    """Where a time-limited run plans again: at twice the step while the lr is constant, then where the
    decay begins, then each time an eighth of the remaining steps is done (None: no more plans)."""
    if not in_decay:
        decay_from = planned * (1 - lr_decay)
        return 2 * step if 2 * step < decay_from else max(step + 1, math.ceil(decay_from))
    left = planned - step
    return step + max(LAST_REPLAN_STEPS // 2, left // DECAY_REPLANS) if left >= LAST_REPLAN_STEPS else None


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def check_compiler() -> None:
    """A clear error now, rather than at the first step, where torch.compile cannot build its kernels."""
    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)(torch.ones(8))
    except Exception as e:  # inductor: no C++ compiler, an unsupported platform, ...
        raise compile_failed(e, "train without --compile") from None


def resolve_compile(cfg: TrainConfig, device: torch.device, world_size: int, steps_per_epoch: int,
                    old: Optional[dict[str, Any]] = None) -> bool:
    """Whether this run compiles its training step. A resumed run (`old`: its config.json) keeps what it
    started with (compiled arithmetic differs from eager in its last bits). Otherwise --compile /
    --no-compile decide; auto (None) compiles one CPU process whose run is long enough for compilation
    to pay (AUTO_COMPILE_MIN_*) on a machine that can compile and where compiling speeds training up (not
    an AVX2-only CPU: `compile_pays_here`), and trains eagerly otherwise (saying why)."""
    if old is not None:
        was = old.get("compiled", bool(old["train"].get("compile")))
        if cfg.compile is not None and cfg.compile != was:
            raise UsageError(f"--resume: the run was trained {'with' if was else 'without'} compilation; "
                             f"resume it {'with --compile' if was else 'with --no-compile'} (or without either)")
        if was:
            check_compiler()
        return was
    if cfg.compile is not None:
        if cfg.compile:
            if world_size > 1:
                raise UsageError("--compile: not supported with several processes yet; train without it under torchrun")
            check_compiler()  # before the run folder exists: a machine that cannot compile loses nothing
        return cfg.compile
    steps = [n for n in (cfg.max_steps, math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else None) if n]
    long_enough = ((cfg.max_minutes is None or cfg.max_minutes >= AUTO_COMPILE_MIN_MINUTES)
                   and (not steps or min(steps) >= AUTO_COMPILE_MIN_STEPS))
    if world_size > 1 or device.type != "cpu" or not long_enough:
        return False
    why_not = compile_pays_here()
    if why_not is not None:
        log.info("training without compilation: %s", why_not)
        return False
    try:
        check_compiler()
    except DitkitError as e:
        log.info("training without compilation: %s", e)
        return False
    return True


def resolve_run_config(cfg: TrainConfig, data) -> dict[str, Any]:
    C, H, W = data.image_shape
    if H != W:
        raise UsageError(f"dataset images are {H}x{W}; DiT needs square images (set --image-size)")
    num_classes = 0 if cfg.unconditional else data.num_classes
    try:
        mcfg = model_config(cfg.model, input_size=H, in_channels=C, num_classes=num_classes,
                            **cfg.block_parts(), **cfg.model_overrides())
    except UsageError as e:
        if not cfg.model_overrides():
            raise
        given = " ".join(f"--{k} {v}" for k, v in cfg.shape_flags().items())
        raise UsageError(f"{cfg.model} with {given}: {e}") from None
    mean = DataMean.stored(data.mean_image()) if cfg.center == "mean" else None
    objective = build_objective(cfg.objective_config(mean, depth=mcfg.depth))
    return {
        "ditkit_version": __version__,
        "family": "dit",
        "model_name": cfg.model,
        "model": mcfg.to_dict(),
        "objective": objective.config(),
        "train": cfg.to_dict(),
        "data": {"name": data.name, "shape": [C, H, W], "num_classes": num_classes,
                 "class_names": list(data.class_names) if num_classes else [], "num_images": len(data),
                 # the label prior, for sampling the data's class mix (`ditkit eval --labels prior`)
                 "class_counts": torch.bincount(data.labels, minlength=num_classes).tolist() if num_classes else []},
    }


def _short(value: Any, limit: int = 60) -> str:
    """repr, cut to `limit` characters (a data_mean image is thousands)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


# config["data"] keys that runs of an older ditkit lack: such a run resumes, and records them from then on
DATA_KEYS_ADDED_LATER = ("class_counts",)


def _check_resume_compatible(old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("model", "objective", "data"):
        a, b = old.get(key), new.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):  # what an older ditkit did not record
            b = {k: v for k, v in b.items() if k in a or k not in DATA_KEYS_ADDED_LATER}
        if key == "model" and isinstance(a, dict):  # a DiT field an older ditkit did not write had its default
            a = {**DiTConfig().to_dict(), **a}
        if a != b:
            fields = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k)) \
                if isinstance(a, dict) and isinstance(b, dict) else []
            diff = ", ".join(f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in fields)
            raise UsageError(f"--resume: the {key} settings differ from the run's config.json"
                             f"{': ' + diff if diff else ''}; resume with the same settings or start a new --out")
    recorded = TrainConfig.recorded(old["train"])
    changed = [k for k, v in new["train"].items() if recorded.get(k) != v and k not in TrainConfig.RESUMABLE_CHANGES]
    if changed:
        raise UsageError(f"--resume: these settings differ from the run's config.json: {', '.join(sorted(changed))}; "
                         "only the run length, logging and device may change")
    ws_old = old.get("world_size", 1)
    if ws_old != new.get("world_size", 1):
        raise UsageError(f"--resume: the run was written by {ws_old} process(es), now {new.get('world_size', 1)}; "
                         "the global batch is the same, but resume with the same world size for a bit-exact run")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a kill -9 may leave some)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            break  # a half-written last line
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def train(cfg: TrainConfig, *, resume: bool = False, dist: Optional[DistContext] = None) -> Path:
    """Train a DiT as `cfg` says; returns the run folder. Ctrl-C saves a checkpoint, then re-raises.
    With `resume`, the fields of `cfg` left at their defaults take the run's recorded values."""
    run_dir = Path(cfg.out)
    old = None
    if resume:
        if not (run_dir / "config.json").exists():
            raise DitkitError(f"--resume: {run_dir} is not a run folder (no config.json); start without --resume")
        old = json.loads((run_dir / "config.json").read_text())
        cfg = replace(cfg).settings_of_run(TrainConfig.recorded(old["train"]))
    cfg.validate()
    dist = dist or DistContext.from_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.device if dist.world_size > 1 else pick_device(cfg.device)
    data = load_dataset(cfg.dataset, image_size=cfg.image_size, channels=cfg.channels)
    if cfg.subset is not None:
        data = data.subset(cfg.subset)
    cfg = replace(cfg, stable_target=cfg.stable_target_refs())  # what auto became is written into the run
    config = resolve_run_config(cfg, data)
    config["world_size"] = dist.world_size
    config["precision"] = resolve_precision(cfg.precision, device)  # what "auto" became on this machine
    if old is None and (run_dir / "config.json").exists():
        raise DitkitError(f"--out {run_dir} already holds a run; add --resume to continue it or pick another --out")
    # --batch-size, --lr and --weight-decay auto: what they become is written into the run (a resumed run
    # reads it back).
    # Measuring the batch counts against a time budget: the run's clock starts before it.
    t_measure = time.monotonic()
    if cfg.batch_size is None:
        cfg = replace(cfg, batch_size=auto_batch_size(cfg, config, device, dist.world_size, len(data)))
    if cfg.lr is None:
        cfg = replace(cfg, lr=lr_for_batch(cfg.batch_size))
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer])
    config["train"] = cfg.to_dict()
    measured_s = time.monotonic() - t_measure
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(data)} images)")

    ckpt = None
    if old is not None:
        _check_resume_compatible(old, config)
        config["compiled"] = resolve_compile(cfg, device, dist.world_size, steps_per_epoch, old)
        if dist.is_main:
            clean_partial(run_dir)
        ckpt = latest_checkpoint(run_dir)
    else:
        config["compiled"] = resolve_compile(cfg, device, dist.world_size, steps_per_epoch)  # what auto became
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config)
    dist.barrier()

    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(config["model"]).to(device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, beta2=cfg.beta2, weight_decay=cfg.weight_decay,
                          device=device)
    objective = build_objective(config["objective"])
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # all training noise: t, eps, label dropout

    step, epoch, pos, elapsed_before, planned = 0, 0, 0, measured_s, None
    anchor = None  # (step, lr factor) where a re-planned lr decay resumes its straight line to 0
    if ckpt is not None:
        state, rng = load_training_state(ckpt, model, ema.model, opt)
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        ema.num_updates = state["ema_updates"]
        elapsed_before = state.get("elapsed_s", 0.0)
        planned = state.get("planned_steps")
        anchor = tuple(state["decay_anchor"]) if state.get("decay_anchor") else None
        gen.set_state(rng["gen"])
        log.info("resumed from %s (step %d)", ckpt, step)
    if dist.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", step)
    net = dist.wrap(model)
    if config["compiled"]:
        # one graph for the training forward (and, through AOTAutograd, its backward): inductor fuses the
        # elementwise work between the matrix products. Its first step compiles (~35 s here), which a
        # time-limited run's re-planning absorbs. Compiled arithmetic differs from eager in its last
        # bits, so a run keeps the setting it started with (resume checks it); resume stays bit-exact.
        net = torch.compile(model, dynamic=False)

    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.epochs is not None:
        limits.append(math.ceil(cfg.epochs * steps_per_epoch))
    total_steps = min(limits) if limits else None
    deadline = time.monotonic() + cfg.max_minutes * 60 - measured_s if cfg.max_minutes else None
    if total_steps is not None:
        planned = total_steps
    # With only a time limit, the step count is planned from the measured speed (so that the lr decay
    # ends with the run), and re-planned at 30, 60, 120, ... steps while the lr is still constant, each
    # time from the speed since the last plan: the first steps are slow (allocator and kernel warm-up),
    # and a plan from them alone left 8-17% of the budget unused. Once the decay has begun, the plan is
    # revised each time an eighth of the remaining steps is done, from the speed since the last revision
    # (a machine that slows down during the decay would otherwise meet the deadline with the lr still
    # high: with revisions at each half, a host that fell from ~480 to ~200 img/s in the last minute
    # stopped a 10-minute run at 11% of the peak lr); the lr then falls on a straight line from
    # its present value to 0 at the new end, so it never jumps. Under DDP, rank 0's plan and rank 0's
    # clock are everyone's (ranks that stopped on different steps would hang in the all-reduce).
    plan_at = step + PLAN_AFTER_STEPS if planned is None and deadline is not None and cfg.lr_decay > 0 else None
    shape = tuple(data.image_shape)
    B, local_B = cfg.batch_size, cfg.batch_size // dist.world_size
    amp = config["precision"] == "bf16"
    model.train()
    t_start = time.monotonic()  # the run's clock (elapsed_s) includes compiling
    if config["compiled"]:
        # Compile now, inside the time budget, on a batch of the run's shapes that leaves the run's state
        # alone (its gradients are dropped; no optimiser step, no draw from the run's generator). Under
        # --compile auto, a model that fails to compile then trains eagerly instead of stopping.
        try:
            _probe_step(net, objective, shape, local_B, config["model"]["num_classes"], device, amp)
        except Exception as e:
            if cfg.compile:
                raise compile_failed(e, "train without --compile") from None
            log.warning("training without compilation: torch.compile failed on this model (%s)", first_line(e))
            net = dist.wrap(model)
            config["compiled"] = False
            atomic_write_json(run_dir / "config.json", config)
        finally:
            opt.zero_grad(set_to_none=True)

    def out_of_time() -> bool:
        if deadline is None:
            return False
        if dist.world_size == 1:
            return time.monotonic() >= deadline
        if step % 10:  # ranks decide together, every 10 steps, on rank 0's clock
            return False
        return bool(dist.agree(int(time.monotonic() >= deadline)))

    def decay_factor(step: int) -> float:
        """1 until the decay starts, then a straight line to 0 at the planned end (from the re-plan anchor)."""
        if cfg.lr_decay <= 0 or not planned:
            return 1.0
        start, w0 = anchor if anchor is not None else (planned * (1 - cfg.lr_decay), 1.0)
        if step < start:
            return 1.0
        return w0 * max(0.0, (planned - step) / max(planned - start, 1.0))

    def lr_at(step: int) -> float:
        """Linear warm-up, constant, then (with --lr-decay) a linear decay to 0 over the run's last part."""
        w = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return cfg.lr * w * decay_factor(step)

    def checkpoint_now() -> None:
        if dist.is_main:
            save_checkpoint(run_dir, step, model, ema.model, opt,
                            dict(epoch=epoch, pos=pos, ema_updates=ema.num_updates,
                                 elapsed_s=elapsed_before + time.monotonic() - t_start, world_size=dist.world_size,
                                 planned_steps=planned, decay_anchor=list(anchor) if anchor else None),
                            {"gen": gen.get_state()}, keep=cfg.keep_checkpoints)
        dist.barrier()

    guide_kept = guide_checkpoint(run_dir) is not None

    def guide_due() -> bool:
        """The weak model for autoguidance: the EMA at `guide_at` of the planned steps (of the time budget
        while no plan exists yet). Saved once; a resumed run keeps the one it has."""
        if guide_kept or cfg.guide_at <= 0:
            return False
        if planned:
            return step >= cfg.guide_at * planned
        return deadline is not None and time.monotonic() - t_start + elapsed_before >= cfg.guide_at * cfg.max_minutes * 60

    def grid_now() -> None:
        if dist.is_main:
            save_sample_grid(run_dir, ema.model, objective, step, cfg, config["precision"])

    bar = None
    if cfg.progress and dist.is_main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    metrics_f = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None
    lo, hi = dist.rank * local_B, (dist.rank + 1) * local_B
    perm = epoch_permutation(len(data), cfg.seed, epoch)
    mark_step, mark_t = step, time.monotonic()  # where the speed for the next plan is measured from
    win_t, win_imgs, win_loss, win_n = time.monotonic(), 0, 0.0, 0
    try:
        while (planned is None or step < planned) and not out_of_time():
            idx = perm[pos * B:(pos + 1) * B]
            x, y = data.batch(idx[lo:hi])
            x, y = x.to(device, non_blocking=True), y.to(device)
            cond = Condition.from_labels(y, config["model"]["num_classes"]) if config["model"]["num_classes"] \
                else Condition.none(local_B)
            noise = objective.sample_noise(B, shape, gen)  # the global batch's randomness, then our share
            noise = {k: v[lo:hi] for k, v in noise.items()}
            reference = None
            if objective.stable_target:  # drawn after the noise: runs without it keep their stream
                ref_x, ref_y = data.draw(objective.stable_target, gen)
                reference = (ref_x.to(device), ref_y.to(device) if config["model"]["num_classes"] else None)
            if plan_at is not None and step == plan_at:
                # (re-)plan; the plan is kept in the checkpoints, and a resumed run follows it
                now = time.monotonic()
                sec_per_step = (now - mark_t) / max(step - mark_step, 1)
                new_plan = max(step + 1, dist.agree(step + int(0.98 * (deadline - now) / sec_per_step)))
                mark_step, mark_t = step, now
                if anchor is not None or step >= new_plan * (1 - cfg.lr_decay):
                    anchor = (step, decay_factor(step))  # in the decay: go on from here, without a jump
                planned = new_plan
                plan_at = next_plan_step(step, planned, cfg.lr_decay, in_decay=anchor is not None)
                if bar is not None:
                    bar.total = planned
            lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = objective.loss(net, x, cond, noise=noise, reference=reference)
            opt.zero_grad(set_to_none=True)
            with dist.collective("the gradient all-reduce"):  # a dead or stalled peer: one clear line
                loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in model.parameters() if p.grad is not None])))
            opt.step()
            ema.update(model)
            step += 1
            pos += 1
            if pos == steps_per_epoch:
                epoch, pos = epoch + 1, 0
                perm = epoch_permutation(len(data), cfg.seed, epoch)
            loss_v = dist.mean(loss.detach())
            win_imgs += B
            win_loss += loss_v
            win_n += 1
            if bar is not None:
                bar.update(1)
            if metrics_f is not None and cfg.log_every and step % cfg.log_every == 0:
                now = time.monotonic()
                rec = dict(step=step, epoch=epoch + pos / steps_per_epoch, loss=loss_v, loss_avg=win_loss / win_n,
                           grad_norm=grad_norm, lr=lr, img_per_s=win_imgs / max(now - win_t, 1e-9),
                           elapsed_s=elapsed_before + now - t_start)
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss_avg']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                win_t, win_imgs, win_loss, win_n = now, 0, 0.0, 0
            if cfg.sample_every and step % cfg.sample_every == 0:
                grid_now()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint_now()
            if guide_due():
                guide_kept = True
                if dist.is_main:
                    save_guide(run_dir, step, ema.model)
                    log.info("kept the EMA weights of step %d as the autoguidance model (%s)", step, run_dir / "guide")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log.warning("interrupted: saving a checkpoint at step %d", step)
        checkpoint_now()
        raise
    finally:
        if metrics_f is not None:
            metrics_f.close()
    if bar is not None:
        bar.close()
    checkpoint_now()
    # DDP sits in a reference cycle (its hooks): dropped here, it is freed by finish()'s collection while the
    # process group is alive. Left to the interpreter's exit, gloo's teardown then aborted a rank (SIGABRT,
    # "terminate called without an active exception") in about 1 run of 3 on a loaded machine.
    net = None  # noqa: F841
    dist.finish(model=model, ema=ema.model)  # every rank holds the same weights and EMA; leave the group
    grid_now()
    if dist.is_main:
        from ..viz.plots import plot_loss
        plot_loss(run_dir)
    return run_dir


def _probe_step(net, objective, shape: tuple, batch: int, num_classes: int, device: torch.device,
                amp: bool) -> None:
    """One forward and backward of the training loss through `net` (compiling it, if it is compiled) on a
    zero batch spread over the classes (and zero reference images, with a stable target), with noise from a
    generator of its own: the run's generator is left alone."""
    x = torch.zeros(batch, *shape, device=device)
    cond = (Condition.from_labels(torch.arange(batch, device=device) % num_classes, num_classes) if num_classes
            else Condition.none(batch))  # every class, as in a run
    noise = objective.sample_noise(batch, shape, torch.Generator().manual_seed(0))  # as the loop passes it
    refs = objective.stable_target  # the stable target's weighing is part of the step
    reference = (torch.zeros(refs, *shape, device=device),  # labels in order, as ImageDataset.draw gives them
                 torch.arange(refs, device=device) * num_classes // refs if num_classes else None) if refs else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = objective.loss(net, x, cond, noise=noise, reference=reference)
    loss.backward()


def seconds_per_step(model_config: dict[str, Any], objective, shape: tuple, batch: int, device: torch.device,
                     amp: bool, steps: int = PROBE_STEPS, warmup: int = PROBE_WARMUP,
                     optimizer: str = TrainConfig.optimizer) -> float:
    """The measured time of one training step (forward, backward, the optimiser's step) at `batch` on a
    fresh copy of the model: the fastest of `steps` timed steps after `warmup` untimed ones."""
    model = build_model(model_config).to(device).train()
    opt = build_optimizer(model, optimizer, lr=1e-3, beta2=0.99, weight_decay=0.0, device=device)
    best = math.inf
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _probe_step(model, objective, shape, batch, model_config["num_classes"], device, amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best


def auto_batch_size(cfg: TrainConfig, config: dict[str, Any], device: torch.device, world_size: int,
                    num_images: int) -> int:
    """What --batch-size auto becomes (see AUTO_BATCHES). 64 unless the run is limited by time alone and
    trains in one process: then the first of AUTO_BATCHES whose measured step buys AUTO_BATCH_MIN_STEPS
    steps in the budget (else the last)."""
    if cfg.max_minutes is None or cfg.max_steps is not None or cfg.epochs is not None or world_size > 1:
        return BASE_BATCH
    objective = build_objective(config["objective"])
    shape, amp = tuple(config["data"]["shape"]), config["precision"] == "bf16"
    candidates = [b for b in AUTO_BATCHES if b <= num_images] or [min(AUTO_BATCHES)]
    said = []
    for batch in candidates:
        steps = int(cfg.max_minutes * 60 / seconds_per_step(config["model"], objective, shape, batch, device, amp,
                                                              optimizer=cfg.optimizer))
        said.append(f"{steps:,} steps at batch {batch}")
        if steps >= AUTO_BATCH_MIN_STEPS:
            break
    log.info("--batch-size auto: %d (measured here, %s minutes buy %s; wanted >= %d steps)", batch,
             f"{cfg.max_minutes:g}", ", ".join(said), AUTO_BATCH_MIN_STEPS)
    return batch


@torch.no_grad()
def save_sample_grid(run_dir: Path, ema_model, objective, step: int, cfg: TrainConfig,
                     precision: str = "fp32") -> Optional[Path]:
    """A 10x10 grid of EMA samples (fixed seeds; one class per column) at this step, drawn in the run's
    `precision`: a run that trains in bf16 draws from a bf16 copy of the EMA, as `ditkit sample
    --precision bf16` would. A time-limited run spends this time off its steps: on Zen 5 1.21 against
    3.15 s a grid of 19 NFE, a 10-minute run's ~9 grids 1.8% of its budget against 4.7%
    (`benchmarks/train_grid.py`)."""
    from ..sampling import PRECISIONS, LoadedModel, generate
    from ..viz.grids import save_grid

    was_training = ema_model.training
    net = ema_model.eval()
    if precision != "fp32":
        net = copy.deepcopy(ema_model).to(PRECISIONS[precision])
    nc = ema_model.config.num_classes
    n = 10 * max(1, min(nc, 10)) if nc else 64
    lm = LoadedModel(net, objective, {})
    out = generate(lm, num=n, labels=None, seed=GRID_SEED, batch_size=n, sampler=cfg.sample_sampler,
                   steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale if nc else 1.0)
    ema_model.train(was_training)
    return save_grid(out["images"], Path(run_dir) / "samples" / f"step_{step:07d}.png", nrow=min(nc, 10) if nc else 8)
