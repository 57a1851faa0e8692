"""The shared behaviour of ditkit's config dataclasses (every model family's and the text encoder's): read
from and written to the JSON of a run folder, with unknown fields refused by name.

    @dataclass
    class DiTConfig(ConfigBase):
        KIND = "DiT"          # the name errors use
        depth: int = 4
        def validate(self) -> "DiTConfig": ...   # the family's own checks; returns self
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

from .errors import UsageError

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    KIND: ClassVar[str] = "model"

    def validate(self: C) -> C:
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON has them (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config of a dict (a run's config.json section), validated; a UsageError names unknown fields."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown {cls.KIND} config field(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(known))}")
        return cls(**d).validate()
