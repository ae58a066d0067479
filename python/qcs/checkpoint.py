"""Checkpoints: weights as safetensors, metadata as JSON, optimizer / scheduler state as a
tensors-only ``torch.save`` file read back with ``weights_only=True``.

A checkpoint ``NAME`` in a directory is three files::

    NAME.safetensors   model weights (its metadata repeats the epoch, for a consistency check)
    NAME.json          config, class names in label order, epoch, metrics
    NAME.state.pt      optimizer, scheduler (and AMP scaler) state: only tensors and numbers

Each file is written to a temporary name and renamed (``os.replace``), so an interruption
leaves either the previous checkpoint or the new one, never a torn file. The JSON is
written last and names the epoch; loading checks the weights carry the same epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["save_checkpoint", "read_metadata", "load_weights", "load_state", "checkpoint_base",
           "CheckpointError"]

FORMAT = "qcs-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, foreign or inconsistent (the message names it)."""


def checkpoint_base(path: str | Path) -> Path:
    """``run/last``, ``run/last.json`` or ``run/last.safetensors`` -> ``run/last``; a run
    directory -> ``run/last``."""
    path = Path(path)
    if path.is_dir():
        return path / "last"
    for suffix in (".safetensors", ".json", ".state.pt"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(base: str | Path, model: torch.nn.Module, meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> None:
    """Write ``base.safetensors``, ``base.state.pt`` (if ``state``) and ``base.json``."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    epoch = str(meta.get("epoch", ""))
    _atomic(base.with_name(base.name + ".safetensors"),
            lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "epoch": epoch}))
    if state is not None:
        _atomic(base.with_name(base.name + ".state.pt"), lambda p: torch.save(state, p))
    text = json.dumps({"format": FORMAT, **meta}, indent=2)
    _atomic(base.with_name(base.name + ".json"), lambda p: p.write_text(text))


def read_metadata(base: str | Path) -> dict[str, Any]:
    """The JSON metadata of checkpoint ``base``."""
    path = checkpoint_base(base).with_name(checkpoint_base(base).name + ".json")
    if not path.is_file():
        raise CheckpointError(f"checkpoint metadata {path} not found")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qcs checkpoint (format {meta.get('format')!r})")
    return meta


def load_weights(base: str | Path, expect_epoch: Any = None) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``base`` (safetensors: tensors only, nothing executed)."""
    b = checkpoint_base(base)
    path = b.with_name(b.name + ".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} not found")
    with safe_open(str(path), framework="pt") as fh:
        file_meta = fh.metadata() or {}
        if expect_epoch is not None and file_meta.get("epoch") != str(expect_epoch):
            raise CheckpointError(f"{path} holds epoch {file_meta.get('epoch')!r} but its JSON "
                                  f"says {expect_epoch!r} (a torn save?)")
        return {k: fh.get_tensor(k) for k in fh.keys()}


def load_state(base: str | Path) -> dict[str, Any]:
    """Optimizer / scheduler state of checkpoint ``base`` (``weights_only=True``)."""
    b = checkpoint_base(base)
    path = b.with_name(b.name + ".state.pt")
    if not path.is_file():
        raise CheckpointError(f"optimizer state {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)
