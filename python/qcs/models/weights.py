"""The one weight loader: read a ``.pth`` (``weights_only=True``) or ``.safetensors`` file,
strip name prefixes, keep the tensors whose names and shapes fit a module, load them and
return a :class:`LoadReport`. Every family's pretrained weights go through
:func:`load_matching`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, WeightsError

__all__ = ["LoadReport", "load_matching", "read_state", "strip_prefixes"]


@dataclass
class LoadReport:
    """What :func:`load_matching` matched, missed and left unused.

    ``matched``: names loaded; ``missing``: the module's names the file lacks;
    ``unexpected``: the file's names the module lacks; ``mismatched``: names in both with
    different shapes (``"name (file shape) vs (ours)"``)."""

    path: str
    what: str = "weights"
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def unused(self) -> int:
        """Tensors of the file that were not loaded."""
        return len(self.unexpected) + len(self.mismatched)

    def __str__(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        lines = [f"{self.what} {self.path}: {len(self.matched)} matched, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} shape-mismatched ({self.unused} unused)"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape-mismatched", self.mismatched)):
            if keys:
                lines.append(f"  {name}: {few(keys)}")
        return "\n".join(lines)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` (a top-level ``state_dict`` entry is unwrapped; non-tensors are
    dropped). :class:`FileNotFoundError` / :class:`CheckpointError` name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the file is foreign input: say which and why
        raise CheckpointError(f"cannot read weights from {path} (tensors only, "
                              f"weights_only=True): {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """``key`` with any of ``prefixes`` removed from its start, repeatedly
    (``module.ir_back.body.0`` -> ``body.0``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_matching(module: nn.Module, path: str | Path, *, prefixes: tuple[str, ...] = (),
                  select: tuple[str, ...] = (), what: str = "weights",
                  require_match: bool = False,
                  rename: Callable[[str], str] | None = None) -> LoadReport:
    """Load the tensors of file ``path`` that fit ``module`` by name and shape.

    Args:
        prefixes: name prefixes to strip (``module.`` of DataParallel, a wrapper's name).
        select: when some names start with one of these, only those are considered (the
            backbone's part of a whole-model checkpoint).
        what: how the report names the weights.
        require_match: raise :class:`WeightsError` when no tensor fits (a wrong file).
        rename: applied to each name after the prefixes are stripped (another layout's
            module names onto ours).
    """
    raw = read_state(path)
    if select and any(k.startswith(select) for k in raw):
        raw = {k: v for k, v in raw.items() if k.startswith(select)}
    state = {strip_prefixes(k, prefixes): v for k, v in raw.items()}
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    own = module.state_dict()
    report = LoadReport(str(path), what)
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            report.matched.append(key)
    report.missing = [k for k in own if k not in state]
    if require_match and not report.matched:
        raise WeightsError(f"{path}: no tensor matches the {what} (wrong file?)")
    module.load_state_dict({k: state[k] for k in report.matched}, strict=False)
    return report
