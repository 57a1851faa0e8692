"""Training options that were measured and found no better than the default recipe. They left
`ditkit train`'s command line, and live on here, from Python; runs that used them still load, sample and
resume (their settings are in config.json, and `TrainConfig` keeps the fields).

    from ditkit.experimental import train, train_config
    run = train(train_config(out="runs/disp", max_minutes=10, dispersive=0.25))
    run = train(train_config(out="runs/disp", max_minutes=20), resume=True)   # resumes with dispersive=0.25

What each does, and what it measured against the default (10-minute MNIST runs of DiT-T/4, scored by FID
relative to the data's own floor and class accuracy; docs/history/BENCHMARKS-rounds.md has the runs):

- `dispersive=W`, `dispersive_block=K`: Wang & He's (2025) dispersive loss, W * log mean_ij
  exp(-|z_i - z_j|^2 / D) over the batch, z the tokens after block K (default the middle one). W = 0.25:
  1.28x the floor against the default's 1.11-1.36x from the same seed, within the noise; the term reaches
  its floor, log(1 / batch), by about step 4,000 and stops pushing.
- `stratified_time=True`: a batch's training times one per stratum of the time distribution (Kingma et al.
  2021); an unbiased loss with 13-19% less spread, but three step-matched pairs gave 1.64x against 1.62x.
- `train_guidance=S`: model guidance (Tang et al. 2025), the network learns the CFG-guided prediction at
  scale S and samples with one evaluation a step. It costs ~20% of the training steps and landed at 2.78x
  with no CFG, where the default reaches ~1.9x with CFG: worse per CPU-minute (cheaper to sample).
- `norm="rmsnorm"`, `qk_norm=True`, `mlp="swiglu"`, `rope=True`: LightningDiT's block parts (Yao et al.
  2025). 6-18% fewer steps in the same time; better in two time-limited pairs, worse in a step-matched one
  (2.67x against 1.75x): no gain shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .train.config import TrainConfig

__all__ = ["OPTIONS", "REMOVED_FLAGS", "TrainConfig", "removed_flag_message", "train", "train_config"]

# the TrainConfig field of each option, and its one-line verdict
OPTIONS: dict[str, str] = {
    "dispersive": "the dispersive loss (Wang & He 2025): within the noise of the default",
    "dispersive_block": "the block whose tokens the dispersive loss spreads apart",
    "stratified_time": "stratified training times: lower-variance loss, same quality",
    "train_guidance": "model guidance (Tang et al. 2025): worse per CPU-minute",
    "norm": "LightningDiT's RMSNorm under adaLN: no gain shown",
    "qk_norm": "LightningDiT's RMSNorm on queries and keys: no gain shown",
    "mlp": "LightningDiT's SwiGLU MLP: no gain shown",
    "rope": "LightningDiT's 2-D rotary positions: no gain shown",
}

# the command-line flags that set them before, and the field each set
REMOVED_FLAGS: dict[str, str] = {"--" + name.replace("_", "-"): name for name in OPTIONS}


def removed_flag_message(flag: str) -> str:
    """The one-line error for a flag that left `ditkit train`: what it was, and the Python route."""
    field = REMOVED_FLAGS[flag]
    return (f"{flag} is no longer a `ditkit train` flag ({OPTIONS[field]}); it stays reachable from Python: "
            f"ditkit.experimental.train(ditkit.experimental.train_config({field}=..., ...)) "
            "(see `python -m pydoc ditkit.experimental`)")


def train_config(**fields: Any) -> TrainConfig:
    """A TrainConfig with these fields (any TrainConfig field, the experimental ones included), checked.
    With no run length given, the run is one epoch, as `ditkit train` does."""
    if not {"max_steps", "epochs", "max_minutes"} & set(fields):
        fields["epochs"] = 1.0
    unknown = sorted(set(fields) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        from .errors import UsageError

        raise UsageError(f"train_config: no such setting {', '.join(unknown)}; the experimental ones are "
                         f"{', '.join(OPTIONS)}")
    return TrainConfig(**fields).validate()


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """`ditkit.train.loop.train`: train as `cfg` says, returns the run folder (imported on first use, so that
    the command line can read this module's flag list without loading the training loop)."""
    from .train.loop import train as train_loop

    return train_loop(cfg, resume=resume)
