"""Optimisation: SAM and the optimizer / scheduler built from a config."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig
from .sam import SAM

__all__ = ["SAM", "build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The base optimizer (Adam / AdamW / SGD) with ``cfg.lr`` and ``cfg.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be adam, adamw or sgd, got {cfg.name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    """ExponentialLR with ``cfg.lr_gamma``, stepped once per epoch."""
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
