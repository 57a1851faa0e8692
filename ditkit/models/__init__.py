from .dit import DiT, DiTConfig
from .registry import PRESETS, build_model, model_config

__all__ = ["DiT", "DiTConfig", "PRESETS", "build_model", "model_config"]
