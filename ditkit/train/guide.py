"""The weak model of autoguidance (Karras et al. 2024), chosen by what it is, not by when it was made.

Autoguidance extrapolates away from a weaker version of the model. A fixed fraction of the *wall time*
picks a very different model on a slow or busy machine: an early speed estimate taken while compiling, or
while other work runs, can plan a short run and keep the EMA of step 272 of 4,900, and guiding away from
a model that weak ruins the samples (FID 1.7x -> 13x the floor). So the run keeps EMA snapshots along a
step ladder in memory and, whenever it saves (and at its end), writes as RUN/guide the snapshot nearest to
`guide_at` x the steps trained *so far*: the guide is always that fraction of the model it guides.

The ladder holds at most `max_snapshots` copies of the EMA weights (a DiT-T/4 is ~3 MB): snapshots are
taken every `interval` steps, and when the ladder is full every other one is dropped and the interval
doubles, so the nearest snapshot is within interval / (guide_at x steps) of the target, about 1/8 of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class GuideLadder:
    def __init__(self, guide_at: float, first_interval: int = 1, max_snapshots: int = 16,
                 kept_step: Optional[int] = None):
        self.guide_at = guide_at
        self.interval = first_interval
        self.max_snapshots = max_snapshots
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.kept_step = kept_step  # the step of the guide on disk (a resumed run's), or None

    def observe(self, step: int, ema_model: nn.Module) -> None:
        """After each optimiser step: take a snapshot of the EMA when the step lands on the ladder."""
        if self.guide_at <= 0 or step % self.interval:
            return
        self.snapshots[step] = {k: v.detach().clone() for k, v in ema_model.state_dict().items()}
        if len(self.snapshots) > self.max_snapshots:
            self.interval *= 2
            self.snapshots = {s: w for s, w in self.snapshots.items() if s % self.interval == 0}

    def target(self, step: int) -> float:
        return self.guide_at * step

    def choose(self, step: int) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        """The snapshot to keep as the guide of a model at `step`: the nearest to guide_at x step (never the
        model itself), or None where the guide on disk is already as near (or nothing is kept)."""
        if self.guide_at <= 0 or not self.snapshots:
            return None
        target = self.target(step)
        best = min((s for s in self.snapshots if s < step), key=lambda s: abs(s - target), default=None)
        if best is None:
            return None
        if self.kept_step is not None and abs(self.kept_step - target) <= abs(best - target):
            return None
        return best, self.snapshots[best]


SNAPSHOT_BUDGET_BYTES = 1 << 30  # the ladder's memory, at most (16 snapshots of a DiT-T/4 take ~50 MB)


def guide_snapshots(model: nn.Module, budget_bytes: int = SNAPSHOT_BUDGET_BYTES) -> int:
    """How many EMA snapshots the ladder may hold for `model`: 16, fewer for a large model (at least 2)."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(2, min(16, budget_bytes // max(size, 1)))
