"""The learning rate of every training step: linear warm-up, constant, then a straight line to 0 over the
run's last `lr_decay` fraction, and how many steps "the run" is when only a time budget bounds it.

With a step limit (--max-steps, --epochs) the plan is fixed. With only a time limit the step count is
planned from the measured speed (so that the lr decay ends with the run), and re-planned at 30, 60, 120,
... steps while the lr is still constant, each time from the speed since the last plan: the first steps
are slow (allocator and kernel warm-up), and a plan from them alone left 8-17% of the budget unused. Once
the decay has begun, the plan is revised each time an eighth of the remaining steps is done, from the
speed since the last revision (a machine that slows down during the decay would otherwise meet the
deadline with the lr still high: with revisions at each half, a host that fell from ~480 to ~200 img/s in
the last minute stopped a 10-minute run at 11% of the peak lr); the lr then falls on a straight line from
its present value to 0 at the new end, so it never jumps. Under DDP, rank 0's plan is everyone's (`agree`):
ranks that stopped on different steps would hang in the all-reduce.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

PLAN_AFTER_STEPS = 30  # with only --max-minutes: plan the run after this many steps, re-plan at 2x, 4x, ...
DECAY_REPLANS = 8  # during the lr decay, re-plan each time 1/DECAY_REPLANS of the remaining steps is done,
LAST_REPLAN_STEPS = 16  # until fewer than this many remain
PLAN_MARGIN = 0.98  # plan to end at 98% of the time left: the last steps, checkpoint and grid fit the budget


def next_plan_step(step: int, planned: int, lr_decay: float, *, in_decay: bool) -> Optional[int]:
    """Where a time-limited run plans again: at twice the step while the lr is constant, then where the
    decay begins, then each time an eighth of the remaining steps is done (None: no more plans)."""
    if not in_decay:
        decay_from = planned * (1 - lr_decay)
        return 2 * step if 2 * step < decay_from else max(step + 1, math.ceil(decay_from))
    left = planned - step
    return step + max(LAST_REPLAN_STEPS // 2, left // DECAY_REPLANS) if left >= LAST_REPLAN_STEPS else None


class LRPlan:
    """lr(step) = lr * warm-up(step) * decay(step), and the planned length of the run.

    `planned`: the run's step count (None while a time-limited run has not planned yet); `anchor`:
    (step, lr factor) where a re-planned decay resumes its straight line to 0; `deadline`: the
    time.monotonic() at which a time-limited run stops (None: no time limit). `planned` and `anchor` are
    saved in every checkpoint (`state()`), and a resumed run follows them."""

    def __init__(self, lr: float, warmup_steps: int, lr_decay: float, *, step: int = 0,
                 planned: Optional[int] = None, anchor: Optional[tuple[int, float]] = None,
                 deadline: Optional[float] = None):
        self.lr, self.warmup_steps, self.lr_decay = lr, warmup_steps, lr_decay
        self.planned, self.anchor, self.deadline = planned, anchor, deadline
        self.plan_at = step + PLAN_AFTER_STEPS if planned is None and deadline is not None and lr_decay > 0 else None
        self.mark_step, self.mark_t = step, time.monotonic()  # where the speed for the next plan is measured from

    def start_clock(self, step: int) -> None:
        """Measure the speed of the next plan from here (just before the first step: after compiling)."""
        self.mark_step, self.mark_t = step, time.monotonic()

    def decay_factor(self, step: int) -> float:
        """1 until the decay starts, then a straight line to 0 at the planned end (from the re-plan anchor)."""
        if self.lr_decay <= 0 or not self.planned:
            return 1.0
        start, w0 = self.anchor if self.anchor is not None else (self.planned * (1 - self.lr_decay), 1.0)
        if step < start:
            return 1.0
        return w0 * max(0.0, (self.planned - step) / max(self.planned - start, 1.0))

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, constant, then (with lr_decay) linear to 0 at the run's end."""
        w = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.lr * w * self.decay_factor(step)

    def replan_due(self, step: int) -> bool:
        return self.plan_at is not None and step == self.plan_at

    def replan(self, step: int, agree: Callable[[int], int] = lambda n: n) -> int:
        """Plan the run's length again from the speed since the last plan; returns the planned steps.
        `agree` makes every rank take rank 0's number (DistContext.agree)."""
        now = time.monotonic()
        sec_per_step = (now - self.mark_t) / max(step - self.mark_step, 1)
        new_plan = max(step + 1, agree(step + int(PLAN_MARGIN * (self.deadline - now) / sec_per_step)))
        self.mark_step, self.mark_t = step, now
        if self.anchor is not None or step >= new_plan * (1 - self.lr_decay):
            self.anchor = (step, self.decay_factor(step))  # in the decay: go on from here, without a jump
        self.planned = new_plan
        self.plan_at = next_plan_step(step, new_plan, self.lr_decay, in_decay=self.anchor is not None)
        return new_plan

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan."""
        return dict(planned_steps=self.planned, decay_anchor=list(self.anchor) if self.anchor else None)
