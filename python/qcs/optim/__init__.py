"""Optimisation: SAM and the optimizer / scheduler built from a config."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig
from .sam import SAM
from .schedule import LRSchedule

__all__ = ["SAM", "LRSchedule", "build_optimizer", "build_scheduler"]


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps_per_epoch: int = 1, total_steps: int = 1) -> LRSchedule:
    """The per-step learning-rate schedule of ``cfg`` (see :mod:`qcs.optim.schedule`):
    ``cfg.warmup_steps`` of linear warm-up, then ``cfg.schedule`` (``exponential``:
    ``cfg.lr_gamma`` per epoch of ``steps_per_epoch`` steps; ``cosine``: down to
    ``cfg.min_lr_ratio * lr`` at step ``total_steps``). Step it after every optimizer step."""
    return LRSchedule(optimizer, cfg.schedule, steps_per_epoch, total_steps,
                      warmup_steps=cfg.warmup_steps, gamma=cfg.lr_gamma,
                      min_lr_ratio=cfg.min_lr_ratio)
