"""The condition a network sees (docs/DESIGN.md contract 2), with an explicit null value.

Class models use `labels` (B,) int64 with `num_classes` as the null id (derived from the model config,
never a magic constant). Text models (MM-DiT) use `tokens` (B, L, D) embeddings with a `mask` (B, L)
and a `pooled` (B, Dp) sentence vector; their null is the empty prompt's encoding (`text_null`), as the
network saw it under caption dropout, not zeros. Unconditional models use `Condition.none(batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TextNull:
    """The empty prompt's encoding, one row: the null condition of a text model (classifier-free
    guidance's unconditional half, and what caption dropout trains)."""
    tokens: torch.Tensor  # (L0, D) token states of the empty prompt ([CLS] [SEP] for a BERT encoder)
    mask: torch.Tensor  # (L0,) bool, True = real token
    pooled: torch.Tensor  # (Dp,)

    def rows(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D), mask (B, L), pooled (B, Dp)): the row repeated, padded or cut to `length`
        tokens (padding is masked out, so any length that keeps the real tokens encodes the same prompt)."""
        real = int(self.mask.sum())
        if length < real:
            raise ValueError(f"the empty prompt has {real} real tokens; a text condition of {length} cannot hold it")
        tokens = self.tokens.new_zeros(length, self.tokens.shape[1])
        mask = torch.zeros(length, dtype=torch.bool, device=self.mask.device)
        n = min(length, self.tokens.shape[0])
        tokens[:n], mask[:n] = self.tokens[:n], self.mask[:n]
        return (tokens.expand(batch, -1, -1), mask.expand(batch, -1), self.pooled.expand(batch, -1))

    def to(self, device) -> "TextNull":
        return TextNull(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


@dataclass(frozen=True)
class Condition:
    labels: Optional[torch.Tensor] = None  # (B,) int64; value == null_label means "no class"
    null_label: Optional[int] = None  # id of the null class (num_classes); None for non-class models
    tokens: Optional[torch.Tensor] = None  # (B, L, D) text embeddings
    mask: Optional[torch.Tensor] = None  # (B, L) bool, True = real token
    batch: int = 0  # batch size when there is no tensor to read it from
    pooled: Optional[torch.Tensor] = None  # (B, Dp) pooled text embedding (text models)
    text_null: Optional[TextNull] = None  # the empty prompt's encoding: the null of a text condition

    @staticmethod
    def from_labels(labels: torch.Tensor, num_classes: int) -> "Condition":
        labels = torch.as_tensor(labels, dtype=torch.long)
        return Condition(labels=labels, null_label=num_classes, batch=labels.shape[0])

    @staticmethod
    def from_text(tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, text_null: TextNull) -> "Condition":
        """A text condition: token states (B, L, D), their mask (B, L) and pooled vectors (B, Dp)."""
        return Condition(tokens=tokens, mask=mask, pooled=pooled, text_null=text_null, batch=tokens.shape[0])

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
            if self.text_null is None:
                raise ValueError("this text condition has no null (the empty prompt's encoding): build it with "
                                 "Condition.from_text or the model's text encoder")
            tokens, mask, pooled = self.text_null.rows(len(self), self.tokens.shape[1])
            return Condition(tokens=tokens.to(self.tokens.dtype), mask=mask, pooled=pooled.to(self.tokens.dtype),
                             text_null=self.text_null, batch=len(self))
        return self

    def drop(self, drop: torch.Tensor) -> "Condition":
        """This condition with the rows where `drop` (B,) is True replaced by the null (caption or label
        dropout: trains the unconditional model that classifier-free guidance needs)."""
        if not bool(drop.any()) or (self.labels is None and self.tokens is None):
            return self
        null = self.null()
        if self.labels is not None:
            labels = torch.where(drop.to(self.labels.device), null.labels, self.labels)
            return Condition(labels=labels, null_label=self.null_label, batch=len(self))
        d = drop.to(self.tokens.device)
        return Condition(tokens=torch.where(d[:, None, None], null.tokens, self.tokens),
                         mask=torch.where(d[:, None], null.mask, self.mask),
                         pooled=torch.where(d[:, None], null.pooled, self.pooled),
                         text_null=self.text_null, batch=len(self))

    @staticmethod
    def cat(a: "Condition", b: "Condition") -> "Condition":
        """Concatenate two conditions along the batch (used by guidance to run one forward)."""
        def _cat(x, y):
            return None if x is None else torch.cat([x, y])
        return Condition(labels=_cat(a.labels, b.labels), null_label=a.null_label, tokens=_cat(a.tokens, b.tokens),
                         mask=_cat(a.mask, b.mask), batch=len(a) + len(b), pooled=_cat(a.pooled, b.pooled),
                         text_null=a.text_null)

    def index(self, idx) -> "Condition":
        def _ix(x):
            return None if x is None else x[idx]
        labels = _ix(self.labels)
        n = int(torch.arange(len(self))[idx].numel())  # works for slices, index lists and masks alike
        return Condition(labels=labels, null_label=self.null_label, tokens=_ix(self.tokens), mask=_ix(self.mask),
                         batch=n, pooled=_ix(self.pooled), text_null=self.text_null)

    def to(self, device) -> "Condition":
        def _to(x):
            return None if x is None else x.to(device)
        return Condition(labels=_to(self.labels), null_label=self.null_label, tokens=_to(self.tokens),
                         mask=_to(self.mask), batch=self.batch, pooled=_to(self.pooled),
                         text_null=None if self.text_null is None else self.text_null.to(device))
