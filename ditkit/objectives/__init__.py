"""The objective registry: forward process + loss + the adapter to the denoiser contract."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .base import DataMean, Denoiser, Path, karras_sigmas, loglinear_sigmas
from .ddpm import DDPMObjective
from .interpolant import InterpolantObjective

OBJECTIVES = ("ddpm", "linear", "gvp", "vp")  # --objective's choices; "masked" comes with --model MIM-*


def build_objective(config: dict[str, Any]) -> DDPMObjective | InterpolantObjective:
    """Build an objective from its stored config (`objective.config()` round-trips through this)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name == "ddpm":
        return DDPMObjective(**cfg)
    if name in ("linear", "gvp", "vp"):
        return InterpolantObjective(path=name, **cfg)
    if name == "masked":
        from .masked import MaskedObjective
        return MaskedObjective(**cfg)
    raise UsageError(f"--objective {name!r}: allowed {', '.join(OBJECTIVES)}")


__all__ = ["OBJECTIVES", "build_objective", "DDPMObjective", "InterpolantObjective", "DataMean", "Denoiser", "Path",
           "karras_sigmas", "loglinear_sigmas"]
