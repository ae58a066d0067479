"""The one place that turns a :class:`qcs.config.ModelConfig` into a network, by family:
``qcs`` (the QCS / DCS / baseline variants), ``dan`` or ``pcd``."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .dan import DAN
from .network import QCSNet

__all__ = ["build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network for ``cfg`` with fresh (seeded by the caller) weights; nothing loaded.

    Every family has ``model(x [B, C, H, W]) -> logits [B, K]``, ``forward_branches`` and a
    ``branches`` count (items per sampled tuple); DAN and PCD add ``training_loss``."""
    family = getattr(cfg, "family", "qcs")
    if family == "dan":
        return DAN(cfg)
    if family == "pcd":
        from .pcd import PCD
        return PCD(cfg)
    if family != "qcs":
        raise ValueError(f"model.family must be qcs, dan or pcd, got {family!r}")
    return QCSNet(cfg)
