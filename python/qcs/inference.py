"""Loading a trained checkpoint for use: the shared part of ``qcs predict``, ``qcs visualize``
and ``qcs export``.

A checkpoint (see :mod:`qcs.checkpoint`) carries its config and the class names in label
order, so nothing but its path is needed to rebuild the network.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .cli_use import MissingDependency
from .checkpoint import CheckpointError, checkpoint_base, load_weights, read_metadata
from .config import Config, ConfigError, config_from_dict
from .models import QCSNet, build_model

__all__ = ["LoadedModel", "load_model", "resolve_checkpoint", "MissingDependency"]

_CROSS_PREFIXES = ("cross.", "vit_cross.")


@dataclass
class LoadedModel:
    """A network in eval mode with what is needed to feed it.

    ``model(x)`` maps normalised images ``[B, 3, S, S]`` (``S = image_size``) to logits
    ``[B, K]``; ``classes`` are the ``K`` names in label order.
    """

    model: QCSNet
    config: Config
    classes: list[str]
    base: Path
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def channels(self) -> int:
        """Input channels: 3 (RGB), plus the landmark heat maps of a PCD network that
        reads them from beside the images (``model.landmarks = "heatmap"``)."""
        m = self.config.model
        if getattr(m, "family", "qcs") == "pcd" and getattr(m, "landmarks", "") == "heatmap":
            return 3 + int(m.heatmap_channels)
        return 3


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


def load_model(path: str | Path, *, full: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of checkpoint ``path`` and load its weights (safetensors).

    ``full=False`` builds the base network only (the ``baseline`` variant: no cross
    modules, which inference never uses); ``full=True`` keeps the trained variant with its
    cross branch (needed for the CSA maps). Raises :class:`CheckpointError` naming the file.
    """
    base = resolve_checkpoint(path)
    meta = read_metadata(base)
    where = f"{base}.json"
    try:
        cfg = config_from_dict(
            {s: {k: v for k, v in vals.items() if v is not None}
             for s, vals in meta["config"].items()}, where).validate()
    except KeyError:
        raise CheckpointError(f"{where} has no 'config' entry") from None
    except ConfigError as exc:
        raise CheckpointError(f"{where}: its config does not load: {exc}") from None
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != cfg.model.num_classes:
        raise CheckpointError(f"{where}: 'classes' must list the {cfg.model.num_classes} class "
                              f"names, got {classes!r}")
    weights = load_weights(base, expect_epoch=meta.get("epoch"))
    qcs_family = getattr(cfg.model, "family", "qcs") == "qcs"
    if full and (not qcs_family or cfg.model.variant == "baseline"):
        raise CheckpointError(f"{where}: a {getattr(cfg.model, 'family', 'qcs')}/"
                              f"{cfg.model.variant} network has no cross branch (no CSA maps)")
    # the QCS family infers with the base network alone; other families are built whole
    model_cfg = cfg.model if full or not qcs_family else replace(cfg.model, variant="baseline")
    model = build_model(model_cfg)
    if not full and qcs_family:
        weights = {k: v for k, v in weights.items() if not k.startswith(_CROSS_PREFIXES)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{base}.safetensors does not match its config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval().to(device)
    return LoadedModel(model, cfg, [str(c) for c in classes], base, meta)
