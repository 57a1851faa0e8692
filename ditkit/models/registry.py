"""One registry of model presets. The resolved config is stored in every checkpoint, so loading a
model never depends on command-line flags (DESIGN.md, "Network")."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .dit import DiT, DiTConfig

# depth, width, heads, patch: the tutorial's Tiny and the paper's S/B/L/XL shapes (Peebles & Xie, table 1).
PRESETS: dict[str, dict[str, int]] = {
    "DiT-T/2": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    "DiT-T/4": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4),
    "DiT-T/7": dict(depth=4, hidden_size=128, num_heads=4, patch_size=7),
    "DiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "DiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}


def model_config(name: str, *, input_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 **overrides: Any) -> DiTConfig:
    """The resolved config of preset `name` for a data shape; `overrides` change any field."""
    if name not in PRESETS:
        raise UsageError(f"unknown model {name!r}; allowed: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name], input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    cfg.update(overrides)
    return DiTConfig(**cfg).validate()


def build_model(config: DiTConfig | dict) -> DiT:
    if isinstance(config, dict):
        config = DiTConfig.from_dict(config)
    return DiT(config)
