"""Model families: one object per family builds its network, computes its loss, loads its
pretrained weights, says what data it needs and gives its inference network (see
:class:`qcs.families.base.Family`). The training loop, eval, predict, visualize and export
ask the family; nothing else looks inside a network.

Adding a family: write one module with a :class:`Family` subclass instance named ``FAMILY``
and add one line to ``_BUILTIN`` below (or call :func:`register_family` at run time, as a
plugin or a test does). ``docs/architecture.md`` walks through a minimal example.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import DataNeeds, Family, Losses

__all__ = ["DataNeeds", "Family", "Losses", "build_model", "family_names", "get_family",
           "register_family"]

# family name -> module defining FAMILY (imported on first use: the CLI's parser stays light)
_BUILTIN = {
    "qcs": "qcs.families.qcs",   # QCS / DCS / baseline (variant)
    "dan": "qcs.families.dan",   # DAN, "Distract your Attention"
    "pcd": "qcs.families.pcd",   # PCD, product-cross dual attention
}
_loaded: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` available under ``family.name`` (config ``model.family``, its own
    ``[name]`` section). Returns it, so a module can write ``FAMILY = register_family(...)``."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family expects a Family, got {type(family).__name__}")
    _loaded[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    """Every known family: the built-in ones, then those registered at run time."""
    return tuple(dict.fromkeys([*_BUILTIN, *_loaded]))


def get_family(name: str) -> Family:
    """The family called ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in _loaded:
        if name not in _BUILTIN:
            raise ConfigError(f"model.family must be one of {family_names()}, got {name!r}")
        _loaded[name] = importlib.import_module(_BUILTIN[name]).FAMILY
    return _loaded[name]


def build_model(cfg):
    """The network of ``cfg`` (a :class:`qcs.config.Config`) with fresh weights (seeded by
    the caller); nothing is loaded."""
    return cfg.family.build(cfg.net, cfg.model.num_classes)
