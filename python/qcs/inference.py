"""The one way a checkpoint becomes a model: :func:`load_model`, used by ``qcs eval``,
``qcs predict``, ``qcs visualize`` and ``qcs export`` (and by anyone embedding a trained
network).

A checkpoint (see :mod:`qcs.checkpoint`) carries its config and the class names in label
order, so nothing but its path is needed to rebuild the network. Checkpoints of either
config layout load (see :func:`qcs.config.upgrade_legacy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_base, load_weights, read_metadata
from .config import Config, config_of_checkpoint
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, test_transform
from .errors import CheckpointError, ConfigError
from .families import Family

__all__ = ["LoadedModel", "load_model", "resolve_checkpoint"]


@dataclass
class LoadedModel:
    """A network in eval mode with what is needed to feed it.

    ``model(x)`` maps normalised images ``[B, C, S, S]`` (``S = image_size``,
    ``C = channels``) to logits ``[B, K]``; ``classes`` are the ``K`` names in label order;
    ``family`` is the model family that built it."""

    model: nn.Module
    config: Config
    classes: list[str]
    base: Path
    meta: dict[str, Any]

    @property
    def family(self) -> Family:
        """The model family of the checkpoint's config."""
        return self.config.family

    @property
    def image_size(self) -> int:
        """The side of the network's square input, in pixels."""
        return self.config.data.image_size

    @property
    def branches(self) -> int:
        """Images per training tuple (QCS 4, DCS 2, others 1)."""
        return self.family.data_needs(self.config.net).branches

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted from ``[0, 1]`` RGB inputs (ImageNet's)."""
        return tuple(IMAGENET_MEAN)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation the inputs are divided by (ImageNet's)."""
        return tuple(IMAGENET_STD)

    @property
    def resize(self) -> int:
        """The recipe's test resize before the centre crop (0: resize straight to the input)."""
        return self.config.data.resize

    @property
    def data_format(self) -> str:
        """The training data's layout (it decides the face-alignment template)."""
        return self.config.data.format

    def transform(self):
        """``uint8 [3, H, W] -> float32 [3, S, S]``: the recipe's test transform (resize,
        centre crop where the recipe resizes larger, normalise)."""
        return test_transform(self.image_size, resize=self.resize)

    @property
    def channels(self) -> int:
        """Input channels: 3 (RGB), plus landmark heat maps for a network that reads them
        from beside the images (PCD with ``pcd.landmarks = "heatmap"``)."""
        return self.family.data_needs(self.config.net).channels


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint argument -> its base path: a run directory means its ``best`` (then
    ``last``) checkpoint; ``run/best``, ``run/best.json`` or ``run/best.safetensors`` mean
    ``run/best``."""
    path = Path(path)
    if path.is_dir():
        for name in ("best", "last"):
            if (path / f"{name}.json").is_file():
                return path / name
        raise CheckpointError(f"--checkpoint {path}: the directory holds no best.json or "
                              "last.json checkpoint")
    return checkpoint_base(path)


def _config(meta: dict[str, Any], where: str) -> Config:
    try:
        cfg = config_of_checkpoint(meta, where)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: its config does not load: {exc}") from None
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != cfg.model.num_classes:
        raise CheckpointError(f"{where}: 'classes' must list the {cfg.model.num_classes} class "
                              f"names, got {classes!r}")
    return cfg


def load_model(path: str | Path, *, full: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of checkpoint ``path`` and load its weights (safetensors).

    ``full=False`` builds the family's inference network (QCS: the base network without
    the cross branch, which inference never uses); ``full=True`` keeps the trained network
    with its cross branch (needed for the CSA maps; other networks have none).
    Raises :class:`CheckpointError` naming the file."""
    base = resolve_checkpoint(path)
    meta = read_metadata(base)
    where = f"{base}.json"
    cfg = _config(meta, where)
    family = cfg.family
    weights = load_weights(base, expect_epoch=meta.get("epoch"))
    if full:
        family.require_cross_maps(cfg.net, where)
        sec = cfg.net
    else:
        sec, weights = family.inference_section(cfg.net), family.inference_weights(weights)
    model = family.build(sec, cfg.model.num_classes)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{base}.safetensors does not match its config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval().to(device)
    return LoadedModel(model, cfg, [str(c) for c in meta["classes"]], base, meta)
