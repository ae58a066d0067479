"""One optimisation step: the training forward (network + the family's loss, the module DDP
wraps), the optimizer with SAM and the AMP scaler around it."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..families import Family, Losses
from ..optim import SAM, build_optimizer, build_scheduler
from .evaluation import autocast

__all__ = ["Optimization", "TrainForward", "TrainStep", "frozen_bn_stats"]


class TrainForward(nn.Module):
    """``(xs [R, B, C, H, W], ys [R, B]) -> Losses``: the network's ``forward_branches``
    under autocast, then the family's loss in float32. The module DDP wraps, so both SAM
    passes go through it."""

    def __init__(self, model: nn.Module, family: Family, section: Any, device: torch.device,
                 amp: str) -> None:
        super().__init__()
        self.model, self.family, self.section = model, family, section
        self.device, self.amp = device, amp

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> Losses:
        """The losses of one batch of tuples (see the class doc)."""
        with autocast(self.device, self.amp):
            out = self.model.forward_branches(xs)
        return self.family.loss(out, ys, self.section)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """SAM's second pass runs at perturbed weights: keep it out of BN running stats."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule (stepped after every optimizer step), SAM
    around it (or None) and the fp16 scaler (or None), with one ``state_dict`` for
    checkpoints."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    sam: SAM | None
    scaler: Any

    @classmethod
    def build(cls, model: nn.Module, cfg: Config, device: torch.device,
              steps_per_epoch: int) -> Optimization:
        """From ``[optim]`` and ``train.amp`` (fp16 gets a gradient scaler); the schedule
        spans ``train.epochs`` epochs of ``steps_per_epoch`` optimizer steps."""
        opt = build_optimizer(model, cfg.optim)
        sam = SAM(opt, cfg.optim.sam_rho, cfg.optim.sam_adaptive) if cfg.optim.sam else None
        scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
        schedule = build_scheduler(opt, cfg.optim, steps_per_epoch,
                                   steps_per_epoch * cfg.train.epochs)
        return cls(opt, schedule, sam, scaler)

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler (and scaler) state for ``*.state.pt``."""
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when there is a scaler."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        """The base optimizer's step (through the scaler when there is one), then clear the
        gradients."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def overflowed(self) -> bool:
        """fp16 with SAM: unscale the gradients; True (and lower the scale) when they hold
        an inf / NaN, so the step must be skipped."""
        if self.scaler is None:
            return False
        self.scaler.unscale_(self.optimizer)
        skip = not math.isfinite(float(self.sam.grad_norm()))
        self.scaler.update()  # lowers the scale after an overflow
        return skip


class TrainStep:
    """``step(xs, ys) -> Losses``: forward, backward and the optimizer step; with SAM, the
    ascent step, a second forward / backward at the perturbed weights (BN statistics
    frozen) and the descent step. ``forward`` is the (possibly DDP-wrapped)
    :class:`TrainForward` of ``model``."""

    def __init__(self, model: nn.Module, forward: nn.Module, opt: Optimization) -> None:
        self.model, self.forward, self.opt = model, forward, opt

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> Losses:
        """One training step on a batch (the learning rate then moves to the next step's,
        a skipped fp16 step included, so the schedule counts the loop's steps)."""
        losses = self.forward(xs, ys)
        self.opt.backward(losses.total)
        if self.opt.sam is None:
            self.opt.step()
        elif self.opt.overflowed():
            self.opt.optimizer.zero_grad(set_to_none=True)
        else:
            self.opt.sam.first_step()
            with frozen_bn_stats(self.model):
                self.opt.backward(self.forward(xs, ys).total)
            self.opt.sam.restore()
            self.opt.step()
        self.opt.scheduler.step()
        return losses
