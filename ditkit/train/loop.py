"""The training loop: dataset -> loader -> objective.loss(net, x, cond) -> optimiser -> EMA -> checkpoints.

    train(cfg)  =  resolve_run (train/resolve.py: settings, data, model config, run folder, resume)
                -> TrainState.build (model, EMA, optimiser, objective, generator; a checkpoint's state)
                -> Trainer.run (the loop; its lr from an LRPlan, train/lr_plan.py)

Bit-exact resume on CPU: all training randomness comes from one torch.Generator whose state is saved in
every checkpoint, the data order of epoch e is a permutation seeded by (seed, e), and the position in
the epoch is saved; so a resumed run draws the same batches and the same noise as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..condition import Condition
from ..models import build_model
from ..objectives import build_objective
from ..errors import UsageError
from ..images import save_grid
from ..metrics import plot_loss
from ..runs import (PRECISIONS, LoadedModel, guide_checkpoint, load_training_state, read_state, save_checkpoint,
                   save_guide)
from ..settings import SamplingSettings, SettingsError
from ..utils import atomic_write_bytes, atomic_write_json, compile_failed, first_line
from .config import TrainConfig
from .guide import GuideLadder, guide_snapshots
from .distributed import DistContext
from .ema import EMA
from .lr_plan import DECAY_REPLANS, LAST_REPLAN_STEPS, PLAN_AFTER_STEPS, LRPlan, next_plan_step  # noqa: F401
from .optim import build_optimizer
from .resolve import (AUTO_BATCH_MIN_STEPS, AUTO_BATCHES, AUTO_COMPILE_MIN_MINUTES,  # noqa: F401
                      AUTO_COMPILE_MIN_STEPS, BASE_BATCH, BASE_LR, ResolvedRun, auto_batch_size, check_compiler,
                      compile_pays_here, lr_for_batch, probe_step, resolve_compile, resolve_run,
                      resolve_run_config, seconds_per_step)

log = logging.getLogger(__name__)

GRID_SEED = 1234
_probe_step = probe_step  # the name benchmarks/probes/train_compile_variants.py imports


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of `epoch`: a permutation of n seeded by (seed, epoch), kept within torch's seed range."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2 ** 64)
    return torch.randperm(n, generator=g)


def train(cfg: TrainConfig, *, resume: bool = False, dist: Optional[DistContext] = None, start: Any = None) -> Path:
    """Train as `cfg` says; returns the run folder. Ctrl-C saves a checkpoint, then re-raises.
    With `resume`, the fields of `cfg` left at their defaults take the run's recorded values. `start`: a
    fine-tune's (ditkit.finetune.FinetuneStart): its data, its config and the weights it starts from."""
    dist = dist or DistContext.from_env()
    run = resolve_run(cfg, resume=resume, dist=dist, start=start)
    state = TrainState.build(run)
    grid_settings(run.cfg, run.config, state)  # a grid sampler the model cannot use: refused before any step
    trainer = Trainer(run, state, dist)  # compiles, where the run does: a failure leaves no run folder behind
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    if dist.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.run_dir / "config.json", run.config)
        _truncate_metrics(run.run_dir / "metrics.jsonl", state.step)
    dist.barrier()
    trainer.run()
    if dist.is_main:
        plot_loss(run.run_dir)
    return run.run_dir


def grid_settings(cfg: TrainConfig, config: dict[str, Any], state: "TrainState") -> SamplingSettings:
    """The sampling settings of the periodic sample grids (--sample-sampler, --sample-steps,
    --sample-cfg-scale), checked against the model: a bad one is refused before the run folder exists,
    not after the whole run."""
    nc = config["model"]["num_classes"]
    sampler, steps = grid_sampler(cfg, state.objective)
    try:
        settings = SamplingSettings(sampler=sampler, steps=steps, cfg_scale=cfg.sample_cfg_scale if nc else 1.0)
        return settings.validate(LoadedModel(state.ema.model, state.objective, config))
    except SettingsError as e:
        flag = {"sampler": "--sample-sampler", "steps": "--sample-steps", "cfg_scale": "--sample-cfg-scale"}.get(
            e.field, "--sample-" + e.field.replace("_", "-"))
        raise UsageError(f"{flag}: {e.message}") from None


def grid_sampler(cfg: TrainConfig, objective: Any) -> tuple[str, int]:
    """The grids' sampler and steps: --sample-sampler and --sample-steps, or, left at their defaults, the
    objective's own for a family that samples its own way (a masked image model: maskgit, 12 steps)."""
    own = getattr(objective, "default_sampling", None)
    if own and (cfg.sample_sampler, cfg.sample_steps) == (TrainConfig.sample_sampler, TrainConfig.sample_steps):
        return own["sampler"], own["steps"]
    return cfg.sample_sampler, cfg.sample_steps


@dataclass
class TrainState:
    """What a checkpoint holds: the networks, the optimiser, the generator of all training noise, and where
    the run is (step, epoch, position in the epoch, time spent, the lr plan)."""

    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    objective: Any
    gen: torch.Generator
    step: int = 0
    epoch: int = 0
    pos: int = 0
    elapsed_before: float = 0.0  # seconds of the run before this process (and the --batch-size auto measurement)
    planned: Optional[int] = None
    anchor: Optional[tuple[int, float]] = None

    @classmethod
    def build(cls, run: ResolvedRun) -> "TrainState":
        """A fresh state seeded by --seed, or, for a resumed run, its checkpoint's."""
        cfg = run.cfg
        torch.manual_seed(cfg.seed)  # model initialisation
        model = build_model(run.config["model"], run.config.get("family")).to(run.device)
        if run.start is not None:  # a fine-tune: the base's weights, and which of them train
            run.start.prepare(model)
        model.grad_checkpoint = cfg.grad_checkpoint  # a DiT's (resolve_auto_settings refuses other families)
        ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
        opt = build_optimizer(model, cfg.optimizer, lr=cfg.lr, beta2=cfg.beta2, weight_decay=cfg.weight_decay,
                              device=run.device)
        objective = build_objective(run.config["objective"])
        if hasattr(objective, "attach"):  # an objective with parts of its own to load (a tokenizer)
            objective.attach(run.run_dir, run.device)
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # all training noise: t, eps, label dropout
        st = cls(model, ema, opt, objective, gen, elapsed_before=run.measured_s)
        if run.checkpoint is not None:
            state, rng = load_training_state(run.checkpoint, model, ema.model, opt)
            st.step, st.epoch, st.pos = state["step"], state["epoch"], state["pos"]
            ema.num_updates = state["ema_updates"]
            st.elapsed_before = state.get("elapsed_s", 0.0)
            st.planned = state.get("planned_steps")
            st.anchor = tuple(state["decay_anchor"]) if state.get("decay_anchor") else None
            gen.set_state(rng["gen"])
            log.info("resumed from %s (step %d)", run.checkpoint, st.step)
        return st


class Trainer:
    """The loop over one run's steps: draw a batch, take an optimiser step, then log, draw grids and save
    checkpoints as the run's settings say. `run()` reads top to bottom."""

    def __init__(self, run: ResolvedRun, state: TrainState, dist: DistContext):
        self.run_, self.st, self.dist, self.cfg = run, state, dist, run.cfg
        cfg = run.cfg
        self.shape = tuple(run.data.image_shape)
        self.B, self.local_B = cfg.batch_size, cfg.batch_size // dist.world_size
        self.lo, self.hi = dist.rank * self.local_B, (dist.rank + 1) * self.local_B  # this rank's rows
        self.num_classes = run.config["model"]["num_classes"]
        self.amp = run.config["precision"] == "bf16"
        self.captions = None  # text to image: every distinct caption encoded once, before the run's clock starts
        if "text" in run.config:
            from ..text import load_text_encoder
            from ..text.table import CaptionTable
            self.captions = CaptionTable.build(run.data.captions, load_text_encoder(run.config["text"]))
        self.net = self._wrap()
        total = run.total_steps
        deadline = time.monotonic() + cfg.max_minutes * 60 - run.measured_s if cfg.max_minutes else None
        self.plan = LRPlan(cfg.lr, cfg.warmup_steps, cfg.lr_decay, step=state.step, deadline=deadline,
                           planned=total if total is not None else state.planned, anchor=state.anchor)
        state.model.train()
        self.t_start = time.monotonic()  # the run's clock (elapsed_s) includes compiling
        if run.config["compiled"]:
            self._compile_now()
        kept = guide_checkpoint(run.run_dir)
        self.ladder = GuideLadder(cfg.guide_at, max_snapshots=guide_snapshots(state.ema.model),
                                  kept_step=None if kept is None else int(read_state(kept).get("step", 0)))
        self.bar = None
        if cfg.progress and dist.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=self.plan.planned, initial=state.step, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self.perm = epoch_permutation(len(run.data), cfg.seed, state.epoch)
        self.window = _LogWindow()

    def run(self) -> None:
        """Train until the planned step or the deadline; save a checkpoint and a sample grid at the end."""
        st, plan, dist = self.st, self.plan, self.dist
        metrics_f = open(self.run_.run_dir / "metrics.jsonl", "a") if dist.is_main else None
        plan.start_clock(st.step)
        try:
            while (plan.planned is None or st.step < plan.planned) and not self._out_of_time():
                x, cond, noise, reference = self._next_batch()
                if plan.replan_due(st.step):  # the plan is kept in the checkpoints; a resumed run follows it
                    plan.replan(st.step, dist.agree)
                    if self.bar is not None:
                        self.bar.total = plan.planned
                lr = plan.lr_at(st.step)
                loss, grad_norm = self._optimizer_step(x, cond, noise, reference, lr)
                self._advance()
                self._after_step(dist.mean(loss.detach()), grad_norm, lr, metrics_f)
        except KeyboardInterrupt:
            if self.bar is not None:
                self.bar.close()
            log.warning("interrupted: saving a checkpoint at step %d", st.step)
            self._checkpoint()
            raise
        finally:
            if metrics_f is not None:
                metrics_f.close()
        if self.bar is not None:
            self.bar.close()
        self._checkpoint()
        # DDP sits in a reference cycle (its hooks): dropped here, it is freed by finish()'s collection while
        # the process group is alive. Left to the interpreter's exit, gloo's teardown then aborted a rank
        # (SIGABRT, "terminate called without an active exception") in about 1 run of 3 on a loaded machine.
        self.net = None
        dist.finish(model=st.model, ema=st.ema.model)  # every rank holds the same weights and EMA; leave the group
        self._grid()

    # -- one step ---------------------------------------------------------------------------------

    def _next_batch(self):
        """This rank's share of the global batch at the run's position: images, condition, noise and (with a
        stable target) reference images. The noise is drawn for the global batch, then sliced."""
        st, data, device = self.st, self.run_.data, self.run_.device
        idx = self.perm[st.pos * self.B:(st.pos + 1) * self.B]
        x, y = data.batch(idx[self.lo:self.hi])
        x, y = x.to(device, non_blocking=True), y.to(device)
        cond = Condition.from_labels(y, self.num_classes) if self.num_classes else Condition.none(self.local_B)
        if self.captions is not None:
            cond = self.captions.condition(idx[self.lo:self.hi], device)
        noise = st.objective.sample_noise(self.B, self.shape, st.gen)
        noise = {k: v[self.lo:self.hi] for k, v in noise.items()}
        reference = None
        if st.objective.stable_target:  # drawn after the noise: runs without it keep their stream
            ref_x, ref_y = data.draw(st.objective.stable_target, st.gen)
            reference = (ref_x.to(device), ref_y.to(device) if self.num_classes else None)
        return x, cond, noise, reference

    def _optimizer_step(self, x, cond, noise, reference, lr: float) -> tuple[torch.Tensor, float]:
        """Loss, backward, gradient clipping, the optimiser's step and the EMA; returns (loss, grad norm)."""
        st, device = self.st, self.run_.device
        for g in st.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = st.objective.loss(self.net, x, cond, noise=noise, reference=reference)
        st.opt.zero_grad(set_to_none=True)
        with self.dist.collective("the gradient all-reduce"):  # a dead or stalled peer: one clear line
            loss.backward()
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(st.model.parameters(), self.cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in st.model.parameters() if p.grad is not None])))
        st.opt.step()
        st.ema.update(st.model)
        return loss, grad_norm

    def _advance(self) -> None:
        st = self.st
        st.step += 1
        st.pos += 1
        if st.pos == self.run_.steps_per_epoch:
            st.epoch, st.pos = st.epoch + 1, 0
            self.perm = epoch_permutation(len(self.run_.data), self.cfg.seed, st.epoch)

    def _after_step(self, loss: float, grad_norm: float, lr: float, metrics_f) -> None:
        """Log, draw a grid, save a checkpoint and keep the guide model when their turn has come."""
        cfg, st = self.cfg, self.st
        self.window.add(self.B, loss)
        if self.bar is not None:
            self.bar.update(1)
        if metrics_f is not None and cfg.log_every and st.step % cfg.log_every == 0:
            rec = self.window.record(step=st.step, epoch=st.epoch + st.pos / self.run_.steps_per_epoch, loss=loss,
                                     grad_norm=grad_norm, lr=lr, elapsed_s=self._elapsed())
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss_avg']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        if cfg.sample_every and st.step % cfg.sample_every == 0:
            self._grid()
        if cfg.ckpt_every and st.step % cfg.ckpt_every == 0:
            self._checkpoint()
        if self.dist.is_main:
            self.ladder.observe(st.step, st.ema.model)

    # -- around the steps -----------------------------------------------------------------------

    def _wrap(self) -> torch.nn.Module:
        net = self.dist.wrap(self.st.model)
        if self.run_.config["compiled"]:
            # one graph for the training forward (and, through AOTAutograd, its backward): inductor fuses the
            # elementwise work between the matrix products. Its first step compiles (~35 s here), which a
            # time-limited run's re-planning absorbs. Compiled arithmetic differs from eager in its last
            # bits, so a run keeps the setting it started with (resume checks it); resume stays bit-exact.
            net = torch.compile(self.st.model, dynamic=False)
        return net

    def _compile_now(self) -> None:
        """Compile inside the time budget, on a batch of the run's shapes that leaves the run's state alone
        (its gradients are dropped; no optimiser step, no draw from the run's generator). Under --compile
        auto, a model that fails to compile then trains eagerly instead of stopping."""
        try:
            probe_step(self.net, self.st.objective, self.shape, self.local_B, self.num_classes, self.run_.device,
                       self.amp)
        except Exception as e:
            if self.cfg.compile:
                raise compile_failed(e, "train without --compile") from None
            log.warning("training without compilation: torch.compile failed on this model (%s)", first_line(e))
            self.net = self.dist.wrap(self.st.model)
            self.run_.config["compiled"] = False  # what config.json records
        finally:
            self.st.opt.zero_grad(set_to_none=True)

    def _elapsed(self) -> float:
        return self.st.elapsed_before + time.monotonic() - self.t_start

    def _out_of_time(self) -> bool:
        if self.plan.deadline is None:
            return False
        if self.dist.world_size == 1:
            return time.monotonic() >= self.plan.deadline
        if self.st.step % 10:  # ranks decide together, every 10 steps, on rank 0's clock
            return False
        return bool(self.dist.agree(int(time.monotonic() >= self.plan.deadline)))

    def _keep_guide(self) -> None:
        """Write as RUN/guide the EMA snapshot nearest to `guide_at` of the steps trained so far (see
        train/guide.py), where it is nearer than the guide already kept."""
        chosen = self.ladder.choose(self.st.step)
        if chosen is None:
            return
        step, weights = chosen
        save_guide(self.run_.run_dir, step, weights)
        self.ladder.kept_step = step
        log.info("kept the EMA weights of step %d of %d as the autoguidance model (%s)", step, self.st.step,
                 self.run_.run_dir / "guide")

    def _checkpoint(self) -> None:
        st, dist = self.st, self.dist
        if dist.is_main:
            save_checkpoint(self.run_.run_dir, st.step, st.model, st.ema.model, st.opt,
                            dict(epoch=st.epoch, pos=st.pos, ema_updates=st.ema.num_updates,
                                 elapsed_s=self._elapsed(), world_size=dist.world_size, **self.plan.state()),
                            {"gen": st.gen.get_state()}, keep=self.cfg.keep_checkpoints)
            self._keep_guide()
        dist.barrier()

    def _grid(self) -> None:
        if self.dist.is_main:
            save_sample_grid(self.run_.run_dir, self.st.ema.model, self.st.objective, self.st.step, self.cfg,
                             self.run_.config["precision"], self.run_.config)


class _LogWindow:
    """The steps since the last log line: their mean loss and their images per second."""

    def __init__(self):
        self.t, self.imgs, self.loss, self.n = time.monotonic(), 0, 0.0, 0

    def add(self, images: int, loss: float) -> None:
        self.imgs += images
        self.loss += loss
        self.n += 1

    def record(self, *, step: int, epoch: float, loss: float, grad_norm: float, lr: float,
               elapsed_s: float) -> dict[str, Any]:
        """The log line of this window (the keys of metrics.jsonl, in their order); starts a new window."""
        now = time.monotonic()
        rec = dict(step=step, epoch=epoch, loss=loss, loss_avg=self.loss / self.n, grad_norm=grad_norm, lr=lr,
                   img_per_s=self.imgs / max(now - self.t, 1e-9), elapsed_s=elapsed_s)
        self.t, self.imgs, self.loss, self.n = now, 0, 0.0, 0
        return rec


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


@torch.no_grad()
def save_sample_grid(run_dir: Path, ema_model, objective, step: int, cfg: TrainConfig,
                     precision: str = "fp32", config: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """A 10x10 grid of EMA samples (fixed seeds; one class per column) at this step, drawn in the run's
    `precision`: a run that trains in bf16 draws from a bf16 copy of the EMA, as `ditkit sample
    --precision bf16` would. A time-limited run spends this time off its steps: on Zen 5 1.21 against
    3.15 s a grid of 19 NFE, a 10-minute run's ~9 grids 1.8% of its budget against 4.7%
    (`benchmarks/train_grid.py`). `config`: the run's config.json (its family), default a DiT's."""
    from ..sampling import generate

    was_training = ema_model.training
    net = ema_model.eval()
    if precision != "fp32":
        net = copy.deepcopy(ema_model).to(PRECISIONS[precision])
    nc = ema_model.config.num_classes
    n = 10 * max(1, min(nc, 10)) if nc else 64
    lm = LoadedModel(net, objective, config or {})
    prompts = None
    if config and "text" in config:  # a text model: one prompt per column (ditkit.text.captions.grid_prompts)
        from ..text import load_text_encoder
        from ..text.captions import grid_prompts
        lm.text_encoder = load_text_encoder(config["text"])
        prompts = grid_prompts(config["data"].get("captions"))
        nc, n = len(prompts), 10 * len(prompts)
    sampler, steps = grid_sampler(cfg, objective)
    out = generate(lm, num=n, labels=None, prompts=prompts, seed=GRID_SEED, batch_size=n,
                   sampler=sampler, steps=steps, cfg_scale=cfg.sample_cfg_scale if nc else 1.0)
    ema_model.train(was_training)
    return save_grid(out["images"], Path(run_dir) / "samples" / f"step_{step:07d}.png", nrow=min(nc, 10) if nc else 8)
