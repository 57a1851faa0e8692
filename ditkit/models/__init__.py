from .dit import DiT, DiTConfig
from .registry import FAMILY_MODULES, PRESETS, Family, build_model, families, get_family, model_config, preset_family

__all__ = ["DiT", "DiTConfig", "FAMILY_MODULES", "PRESETS", "Family", "build_model", "families", "get_family",
           "model_config", "preset_family"]
