"""Networks: the IR50 backbone, the QCS / DCS / baseline model, DAN and PCD, their losses
and the one weight loader. Families (:mod:`qcs.families`) build them from a config.

The names below are imported on first use (PEP 562), so that importing a light submodule
(``qcs.models.variants``, ``qcs.models.outputs``) does not import torch and the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BRANCHES", "IR50", "BranchOutput", "LoadReport", "QCSNet", "count_parameters",
           "load_backbone_weights", "load_matching", "qcs_loss", "read_state"]

_WHERE = {"IR50": "ir50", "load_backbone_weights": "ir50", "qcs_loss": "losses",
          "BRANCHES": "variants", "QCSNet": "network", "count_parameters": "network",
          "BranchOutput": "outputs", "LoadReport": "weights", "load_matching": "weights",
          "read_state": "weights"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
