"""The condition a network sees (DESIGN.md contract 2), with an explicit null value.

Class models use `labels` (B,) int64 with `num_classes` as the null id (derived from the model config,
never a magic constant). Text models (MM-DiT) use `tokens` (B, L, D) embeddings with a `mask` (B, L).
Unconditional models use `Condition.none(batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Condition:
    labels: Optional[torch.Tensor] = None  # (B,) int64; value == null_label means "no class"
    null_label: Optional[int] = None  # id of the null class (num_classes); None for non-class models
    tokens: Optional[torch.Tensor] = None  # (B, L, D) text embeddings
    mask: Optional[torch.Tensor] = None  # (B, L) bool, True = real token
    batch: int = 0  # batch size when there is no tensor to read it from

    @staticmethod
    def from_labels(labels: torch.Tensor, num_classes: int) -> "Condition":
        labels = torch.as_tensor(labels, dtype=torch.long)
        return Condition(labels=labels, null_label=num_classes, batch=labels.shape[0])

    @staticmethod
    def none(batch: int) -> "Condition":
        return Condition(batch=batch)

    def __len__(self) -> int:
        if self.labels is not None:
            return int(self.labels.shape[0])
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        return self.batch

    def null(self) -> "Condition":
        """The unconditional counterpart of this condition (same batch size)."""
        if self.labels is not None:
            if self.null_label is None:
                raise ValueError("this condition has labels but no null label id")
            return Condition(labels=torch.full_like(self.labels, self.null_label), null_label=self.null_label,
                             batch=len(self))
        if self.tokens is not None:
            return Condition(tokens=torch.zeros_like(self.tokens),
                             mask=torch.zeros_like(self.mask) if self.mask is not None else None, batch=len(self))
        return self

    @staticmethod
    def cat(a: "Condition", b: "Condition") -> "Condition":
        """Concatenate two conditions along the batch (used by guidance to run one forward)."""
        def _cat(x, y):
            return None if x is None else torch.cat([x, y])
        return Condition(labels=_cat(a.labels, b.labels), null_label=a.null_label, tokens=_cat(a.tokens, b.tokens),
                         mask=_cat(a.mask, b.mask), batch=len(a) + len(b))

    def index(self, idx) -> "Condition":
        def _ix(x):
            return None if x is None else x[idx]
        labels = _ix(self.labels)
        n = int(torch.arange(len(self))[idx].numel())  # works for slices, index lists and masks alike
        return Condition(labels=labels, null_label=self.null_label, tokens=_ix(self.tokens), mask=_ix(self.mask),
                         batch=n)

    def to(self, device) -> "Condition":
        def _to(x):
            return None if x is None else x.to(device)
        return Condition(labels=_to(self.labels), null_label=self.null_label, tokens=_to(self.tokens),
                         mask=_to(self.mask), batch=self.batch)
