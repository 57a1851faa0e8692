"""One registry of model families and their presets. The resolved config is stored in every run folder,
so loading a model never depends on command-line flags (docs/DESIGN.md, "Network").

A family lives in its own module, which declares `FAMILY = Family(...)`: its config dataclass, its network
class and its named presets. The registry imports those modules lazily from `FAMILY_MODULES`, so adding a
family means adding its module (and a line here), never editing another family's file.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch.nn as nn

from ..errors import UsageError

# family name -> the module that declares its FAMILY; a module absent from this build is skipped
FAMILY_MODULES: dict[str, str] = {
    "dit": "ditkit.models.dit",
    "unet": "ditkit.models.unet",
    "mmdit": "ditkit.models.mmdit",
    "mim": "ditkit.models.mim",
    "vq": "ditkit.models.vq",
}


@dataclass(frozen=True)
class Family:
    """A model family: `config_cls` is a dataclass with `validate()`, `to_dict()` and `from_dict()` and the
    fields input_size, in_channels and num_classes; `net_cls(config)` builds the network."""

    name: str
    config_cls: type
    net_cls: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    sampleable: bool = True  # False for parts that draw no images themselves (a tokenizer)


_FAMILIES: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """Every family this build has, by name (imported on first use)."""
    for name, module in FAMILY_MODULES.items():
        if name in _FAMILIES:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not part of this build
            raise
        fam = getattr(mod, "FAMILY", None)
        if isinstance(fam, Family):
            _FAMILIES[name] = fam
    return _FAMILIES


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise UsageError(f"model family {name!r}: allowed {', '.join(fams)}")
    return fams[name]


def _all_presets() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for fam in families().values():
        out.update(fam.presets)
    return out


class _Presets(Mapping):
    """Every family's presets by name, looked up when first read (families import lazily)."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return _all_presets()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_all_presets())

    def __len__(self) -> int:
        return len(_all_presets())


PRESETS: Mapping[str, dict[str, Any]] = _Presets()


def preset_family(name: str) -> str:
    """The family of preset `name` (e.g. "DiT-T/4" -> "dit"); a UsageError listing the presets otherwise."""
    for fam in families().values():
        if name in fam.presets:
            return fam.name
    raise UsageError(f"unknown model {name!r}; allowed: {', '.join(PRESETS)}")


def _kind(default: Any) -> Optional[tuple[type, str]]:
    """The type a config field must have, judged from its default, with the word for it in errors."""
    if isinstance(default, bool):
        return bool, "true or false"
    if isinstance(default, int):
        return int, "an integer"
    if isinstance(default, float):
        return float, "a number"
    if isinstance(default, str):
        return str, "a string"
    return None


def check_config_dict(cls: type, d: Any, where: str) -> dict[str, Any]:
    """`d` as keyword arguments of dataclass `cls`: a dict whose keys are fields and whose values have the
    fields' types (judged from their defaults); a UsageError naming the first bad key otherwise."""
    if not isinstance(d, dict):
        raise UsageError(f"{where}: must be a JSON object of settings, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    for name, value in d.items():
        f = known[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _kind(default)
        if kind is None:
            continue
        typ, word = kind
        ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"{where}.{name}: must be {word}, got {value!r}")
    return dict(d)


def model_config(name: str, *, input_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 **overrides: Any):
    """The resolved config of preset `name` for a data shape; `overrides` change any field of its family's
    config (a field the family does not have is refused by name)."""
    fam = get_family(preset_family(name))
    cfg = dict(fam.presets[name], input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    cfg.update(overrides)
    check_config_dict(fam.config_cls, cfg, f"{name} ({fam.name})")
    return fam.config_cls(**cfg).validate()


def family_of_config(config: Any) -> Family:
    for fam in families().values():
        if isinstance(config, fam.config_cls):
            return fam
    raise UsageError(f"{type(config).__name__} is not the config of a registered model family")


def build_model(config: Any, family: Optional[str] = None) -> nn.Module:
    """The network of `config`: a family's config object, or its stored dict (config.json's "model") with
    the family named by `family` ("dit" when None, as runs of older ditkit versions are)."""
    if isinstance(config, dict):
        fam = get_family(family or "dit")
        config = fam.config_cls.from_dict(check_config_dict(fam.config_cls, config, "model"))
    else:
        fam = family_of_config(config)
    return fam.net_cls(config)
