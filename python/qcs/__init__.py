"""The QCS trainer: QCS / DCS / baseline networks for facial expression recognition,
datasets and quadruplet sampling, SAM, checkpoints and the ``qcs`` command.

Importing the package does no work: the entry points below are imported when first used.

- :func:`load_config` a preset or TOML file (with overrides) -> :class:`Config`
- :func:`train` a config into a run directory -> :class:`RunResult`
- :func:`load_model` a checkpoint (or ``.onnx`` file) for inference
- :func:`predict_images` the expressions of the faces in images
- :func:`export_onnx` a checkpoint's inference network to ONNX (verified)
- :class:`QCSError` the base of every error raised on purpose

See ``docs/python-api.md``; :mod:`qcs.cli` is the command line, :mod:`qcs.training` the
loop, :mod:`qcs.families` the model families and :mod:`qcs.models` the networks.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load_config": ("qcs.api", "load_config"),
    "train": ("qcs.training", "train"),
    "load_model": ("qcs.api", "load_model"),
    "predict_images": ("qcs.api", "predict_images"),
    "export_onnx": ("qcs.api", "export_onnx"),
    "Config": ("qcs.config", "Config"),
    "RunResult": ("qcs.training", "RunResult"),
    "Callback": ("qcs.training", "Callback"),
    "QCSError": ("qcs.errors", "QCSError"),
}

__all__ = ["load_config", "train", "load_model", "predict_images", "export_onnx", "Config",
           "RunResult", "Callback", "QCSError", "__version__"]  # = _EXPORTS + __version__


def __getattr__(name: str) -> Any:
    """Import the entry point ``name`` on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qcs' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
