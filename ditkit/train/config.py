"""The training configuration: one typed dataclass, validated up front, written into every run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from ..errors import UsageError
from ..models.layers import MLPS, NORMS
from ..samplers import SAMPLERS
from .optim import OPTIMIZERS

SEED_MAX = 2 ** 63 - 1  # torch generators take a signed 64-bit seed

# The demo recipe, chosen by measurement (docs/BENCHMARKS.md, "The recipe"; how it was chosen:
# docs/history/BENCHMARKS-rounds.md).
DEFAULT_MODEL = "DiT-T/4"
DEFAULT_OBJECTIVE = "linear"
# --stable-target auto: reference images a step (1,024: ~100 of each digit; 40% of the target's noise left
# on MNIST, ~2.5 ms a step at batch 64 (drawn and weighed): benchmarks/probes/stable_target.py)
STABLE_TARGET_REFS = 1024
# defaults that changed: what a run whose config.json lacks the field was trained with
FORMER_DEFAULTS = {"stable_target": 0, "optimizer": "adamw"}


@dataclass
class TrainConfig:
    out: str = "runs/demo"
    model: str = DEFAULT_MODEL
    dataset: str = "mnist"
    image_size: Optional[int] = None  # folder datasets: required; MNIST: 28 unless set
    channels: Optional[int] = None
    subset: Optional[int] = None  # train on the first N images only (tests, quick looks)
    pos_embed: str = "sincos"
    # LightningDiT's block parts (Yao et al. 2025; off: DiT's own): --norm rmsnorm --qk-norm --mlp swiglu --rope
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    rope: bool = False
    # the preset's shape, changed field by field (None = the preset's value)
    depth: Optional[int] = None
    width: Optional[int] = None
    heads: Optional[int] = None
    unconditional: bool = False
    # text to image (MM-DiT): "mnist" (captions generated from each digit, ditkit.text.captions) or a .jsonl
    # caption file; --label-dropout is then the caption dropout (to the empty prompt, for CFG)
    captions: Optional[str] = None
    # masked image models (MIM-*): the tokenizer's run folder (`ditkit train-tokenizer`), whose codes they model
    tokenizer: Optional[str] = None
    # objective
    objective: str = DEFAULT_OBJECTIVE
    prediction: Optional[str] = None  # default per objective: eps (ddpm), velocity (interpolants)
    schedule: str = "linear"  # ddpm beta schedule
    time_sampling: str = "logit-normal"  # interpolants (Esser et al. 2024); measured better per CPU-minute
    min_snr_gamma: Optional[float] = None
    label_dropout: float = 0.1
    logit_mean: float = 0.0  # the logit-normal time distribution's location (interpolants)
    stratified_time: bool = False  # one training time per stratum of the batch (objectives.base.stratified_uniforms)
    # interpolants: reference images a step for a stable target (objectives.base.stable_target_x0); 0 = off,
    # None = auto: STABLE_TARGET_REFS for the interpolants (measured better per CPU-minute), off for ddpm
    stable_target: Optional[int] = None
    center: str = "none"  # "mean": model x0 minus the training images' mean (objectives.base.DataMean)
    # model guidance (interpolants): learn the CFG-guided prediction at this scale; sample it with no CFG
    train_guidance: float = 1.0
    # dispersive loss (Wang & He 2025) on the tokens after one block: its weight (0 = off), and the block
    # (None: the middle one, depth // 2)
    dispersive: float = 0.0
    dispersive_block: Optional[int] = None
    # optimisation
    # None = auto: 64 (better per CPU-minute than 32 where a run makes 5,000+ steps: docs/history/
    # BENCHMARKS-rounds.md), smaller for a run limited by time alone on a CPU too slow for that (loop.auto_batch_size)
    batch_size: Optional[int] = None
    lr: Optional[float] = None  # None = 2.8e-3 at batch 64, scaled by sqrt(batch / 64) (loop.lr_for_batch)
    # "muon": Muon on the blocks' hidden matrices, AdamW on the rest (train.optim), at the same lr; or "adamw".
    # Muon with its weight decay measured better after 10 and 30 minutes (docs/BENCHMARKS.md); a run recorded
    # with no "optimizer" predates it and used AdamW (FORMER_DEFAULTS)
    optimizer: str = "muon"
    # None = auto: the optimiser's own (optim.DEFAULT_WEIGHT_DECAY: 0 for AdamW, 0.1 for Muon, whose runs
    # without it drew worse digits the longer they trained)
    weight_decay: Optional[float] = None
    beta2: float = 0.99
    warmup_steps: int = 200
    lr_decay: float = 0.3  # fraction of the run (at its end) over which the lr falls linearly to 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # autoguidance (Karras et al. 2024): keep the EMA weights at this fraction of the run as the weak model
    # (0.3, measured: better than or equal to 0.25 in five of five paired runs of 4,500 and 8,800 steps)
    guide_at: float = 0.3
    # length (the first limit reached stops the run)
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    max_minutes: Optional[float] = None
    # bookkeeping
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 1000
    keep_checkpoints: int = 0  # 0 = keep all (the report shows samples across checkpoints)
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 (autocast; on the CPU attention stays fp32) | auto (bf16 where native)
    threads: Optional[int] = None
    # torch.compile the training forward and backward (CPU: ~24% more steps/s after ~35 s of compiling):
    # True, False, or None = auto (long runs of one CPU process, where a compiler works; see loop.resolve_compile)
    compile: Optional[bool] = None
    progress: bool = True
    # recompute each block's activations in the backward (DiT): bit-identical losses, less memory, more time
    grad_checkpoint: bool = False
    # --batch-size auto's memory budget ("4GiB"); None = a share of the device's memory (train.memory)
    memory_budget: Optional[str] = None
    sample_sampler: str = "heun"
    sample_steps: int = 10
    sample_cfg_scale: float = 2.0

    # the shape flags and the DiT config fields they set
    SHAPE_FIELDS = dict(depth="depth", width="hidden_size", heads="num_heads")

    def shape_flags(self) -> dict[str, int]:
        """The --depth / --width / --heads given (not None)."""
        return {k: getattr(self, k) for k in self.SHAPE_FIELDS if getattr(self, k) is not None}

    # the block-part flags, each a DiT config field of the same name
    BLOCK_FIELDS = ("pos_embed", "norm", "qk_norm", "mlp", "rope")

    def block_parts(self) -> dict[str, Any]:
        """The DiT config fields that --pos-embed, --norm, --qk-norm, --mlp and --rope set."""
        return {k: getattr(self, k) for k in self.BLOCK_FIELDS}

    def model_overrides(self) -> dict[str, int]:
        """The DiT config fields that the shape flags change in the preset."""
        return {self.SHAPE_FIELDS[k]: v for k, v in self.shape_flags().items()}

    def dispersive_at(self, depth: int) -> int:
        """The block whose tokens --dispersive spreads apart, in a network of `depth` blocks."""
        block = self.dispersive_block if self.dispersive_block is not None else max(1, depth // 2)
        if block > depth:
            raise UsageError(f"--dispersive-block {block}: the model has blocks 1 to {depth}")
        return block

    def stable_target_refs(self) -> int:
        """The reference images a step of --stable-target: what was given, or auto's (None) value."""
        if self.stable_target is not None:
            return self.stable_target
        # off with captions: the stable target pools references by class, and a caption is no class
        return 0 if self.objective == "ddpm" or self.captions else STABLE_TARGET_REFS

    def objective_config(self, data_mean: Any = None, depth: Optional[int] = None) -> dict[str, Any]:
        """The objective's config; `data_mean` (the training images' mean, ImageDataset.mean_image in
        DataMean.stored form) is needed, and used, when --center mean; `depth` (the model's number of
        blocks) when --dispersive is on."""
        if self.center == "mean" and data_mean is None:
            raise UsageError("--center mean: the objective needs the training images' mean image")
        extra = {"data_mean": data_mean} if self.center == "mean" else {}
        if self.stratified_time:  # written only when on: runs from before it existed resume unchanged
            extra["stratified_time"] = True
        refs = self.stable_target_refs()
        if refs:  # written only when on, as stratified_time
            extra["stable_target"] = refs
        if self.dispersive > 0:
            if depth is None:
                raise UsageError("--dispersive: the objective needs the model's depth to place its block")
            extra.update(dispersive=self.dispersive, dispersive_block=self.dispersive_at(depth))
        if self.objective == "ddpm":
            return dict(name="ddpm", prediction=self.prediction or "eps", schedule=self.schedule,
                        min_snr_gamma=self.min_snr_gamma, label_dropout=self.label_dropout, **extra)
        if self.train_guidance != 1:
            extra["train_guidance"] = self.train_guidance
        return dict(name=self.objective, prediction=self.prediction or "velocity", time_sampling=self.time_sampling,
                    logit_mean=self.logit_mean, label_dropout=self.label_dropout, **extra)

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        need(self.batch_size is None or self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr {self.lr}: must be a positive number")
        need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: allowed {', '.join(OPTIMIZERS)}")
        need(self.weight_decay is None or (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             f"--weight-decay {self.weight_decay}: must be a number >= 0")
        need(0 < self.beta2 < 1, f"--beta2 {self.beta2}: must be in (0, 1)")
        need(self.warmup_steps >= 0, f"--warmup-steps {self.warmup_steps}: must be >= 0")
        need(0 <= self.lr_decay <= 1, f"--lr-decay {self.lr_decay}: must be in [0, 1] (a fraction of the run)")
        need(self.grad_clip >= 0, f"--grad-clip {self.grad_clip}: must be >= 0 (0 = off)")
        need(math.isfinite(self.guide_at) and 0 <= self.guide_at < 1,
             f"--guide-at {self.guide_at}: must be in [0, 1) (a fraction of the run; 0 = keep no guide model)")
        need(self.objective != "ddpm" or self.train_guidance == 1,
             f"--train-guidance {self.train_guidance}: model guidance is for the interpolant objectives "
             "(linear, gvp, vp), not ddpm")
        need(not self.unconditional or self.train_guidance == 1,
             f"--train-guidance {self.train_guidance}: guidance needs class labels; drop --unconditional")
        need(self.objective != "ddpm" or self.logit_mean == 0,
             "--logit-mean: for the interpolant objectives' logit-normal times, not ddpm")
        need(self.stable_target is None or self.stable_target >= 0,
             f"--stable-target {self.stable_target}: must be >= 0 (0 = off)")
        need(self.objective != "ddpm" or not self.stable_target,
             "--stable-target: for the interpolant objectives (linear, gvp, vp), not ddpm")
        need(math.isfinite(self.dispersive) and self.dispersive >= 0,
             f"--dispersive {self.dispersive}: must be a number >= 0 (0 = off)")
        need(self.dispersive_block is None or self.dispersive_block >= 1,
             f"--dispersive-block {self.dispersive_block}: must be >= 1 (a block number; default the middle one)")
        need(self.center in ("none", "mean"), f"--center {self.center!r}: allowed none, mean")
        need(math.isfinite(self.logit_mean), f"--logit-mean {self.logit_mean}: must be a finite number")
        need(0 <= self.ema_decay < 1, f"--ema-decay {self.ema_decay}: must be in [0, 1)")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps {self.max_steps}: must be >= 1")
        need(self.epochs is None or self.epochs > 0, f"--epochs {self.epochs}: must be > 0")
        need(self.max_minutes is None or self.max_minutes > 0, f"--max-minutes {self.max_minutes}: must be > 0")
        need(self.max_steps is not None or self.epochs is not None or self.max_minutes is not None,
             "give at least one of --max-steps, --epochs, --max-minutes")
        for flag in ("log_every", "ckpt_every", "sample_every"):
            v = getattr(self, flag)
            need(v >= 0, f"--{flag.replace('_', '-')} {v}: must be >= 0 (0 = only at the end)")
        for flag, v in self.shape_flags().items():
            need(v >= 1, f"--{flag} {v}: must be >= 1")
        need(self.subset is None or self.subset >= 1, f"--subset {self.subset}: must be >= 1")
        from ..models.registry import preset_family
        text_model = preset_family(self.model) == "mmdit"
        need(text_model == (self.captions is not None),
             f"--model {self.model}: a text model trains on --captions (mnist or FILE.jsonl)" if text_model
             else f"--captions: {self.model} takes no text; use a text model (MMDiT-T/4, ...)")
        if self.captions is not None:
            from ..text.captions import check_captions_spec
            check_captions_spec(self.captions)
            need(not self.unconditional, "--captions: a text model is conditioned on its captions; drop --unconditional")
            need(not self.stable_target, "--stable-target: pools references by class; not for --captions (use 0)")
            need(not self.compile, "--compile: not measured for text models yet; train --captions without it")
        need(self.keep_checkpoints >= 0, f"--keep-checkpoints {self.keep_checkpoints}: must be >= 0")
        need(self.precision in ("auto", "fp32", "bf16"), f"--precision {self.precision!r}: allowed auto, fp32, bf16")
        need(self.pos_embed in ("sincos", "learned"), f"--pos-embed {self.pos_embed!r}: allowed sincos, learned")
        need(self.norm in NORMS, f"--norm {self.norm!r}: allowed {', '.join(NORMS)}")
        need(self.mlp in MLPS, f"--mlp {self.mlp!r}: allowed {', '.join(MLPS)}")
        need(self.threads is None or self.threads >= 1, f"--threads {self.threads}: must be >= 1")
        need(isinstance(self.seed, int) and 0 <= self.seed <= SEED_MAX,
             f"--seed {self.seed}: must be an integer in [0, 2**63 - 1]")
        need(self.sample_sampler in SAMPLERS,
             f"--sample-sampler {self.sample_sampler!r}: allowed {', '.join(SAMPLERS)}")
        need(self.sample_steps >= 1, f"--sample-steps {self.sample_steps}: must be >= 1")
        if self.memory_budget is not None:
            from .memory import parse_bytes
            parse_bytes(self.memory_budget)  # a UsageError naming --memory-budget
        need(math.isfinite(self.sample_cfg_scale) and self.sample_cfg_scale >= 0,
             f"--sample-cfg-scale {self.sample_cfg_scale}: must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # Fields that may differ between an interrupted run and its resumption without changing the result.
    RESUMABLE_CHANGES = ("max_steps", "epochs", "max_minutes", "progress", "log_every", "ckpt_every",
                         "sample_every", "keep_checkpoints", "device", "threads", "out", "guide_at",
                         "compile",  # compile: checked against what the run resolved it to (loop.train)
                         "grad_checkpoint", "memory_budget")  # the same losses; the batch is recorded
    @classmethod
    def recorded(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Every field's value in a run's config.json "train" entry `d`; a field that an older ditkit did not
        write had its default then (FORMER_DEFAULTS where it has changed since)."""
        return {f.name: d.get(f.name, FORMER_DEFAULTS.get(f.name, f.default)) for f in fields(cls)}

    # what a resumption states afresh: where the run is, how long it goes on, and whether a bar is drawn
    STATED_ON_RESUME = ("out", "max_steps", "epochs", "max_minutes", "progress")

    def settings_of_run(self, recorded: dict[str, Any]) -> "TrainConfig":
        """For --resume: the fields left at their defaults take the run's values (`recorded`), so that a run
        resumes with the settings it was started with (its logging, device and threads too); its length,
        folder and progress bar stay as given."""
        default = TrainConfig()
        for f in fields(self):
            if f.name not in self.STATED_ON_RESUME and getattr(self, f.name) == getattr(default, f.name):
                setattr(self, f.name, recorded[f.name])
        return self
