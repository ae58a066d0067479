"""The learning rate of every optimizer step: an optional linear warm-up, then either the
paper's per-epoch exponential decay or a cosine decay over the whole run.

``lr(step) = lr * warmup(step) * decay(step)`` with ``step`` counted from 0:

- ``warmup(s) = min(1, (s + 1) / warmup_steps)`` (``1`` when ``warmup_steps = 0``);
- ``exponential``: ``decay(s) = lr_gamma ** (s // steps_per_epoch)``, the same values as
  ``torch.optim.lr_scheduler.ExponentialLR`` stepped once per epoch (the papers' recipe);
- ``cosine``: ``decay(s) = m + (1 - m) * (1 + cos(pi * t)) / 2`` with
  ``t = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to ``[0, 1]`` and
  ``m = min_lr_ratio``: from ``lr`` after the warm-up down to ``m * lr`` at the last step.

The schedule is a pure function of the step count, so a resumed run (which knows its
step) continues it exactly; its state is that count alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SCHEDULES", "LRSchedule"]

SCHEDULES = ("exponential", "cosine")


class LRSchedule:
    """Sets every parameter group's ``lr`` for the coming step.

    Args:
        optimizer: the base optimizer; each group's ``initial_lr`` (its ``lr`` when the
            schedule is made) is the peak its schedule scales.
        schedule: ``"exponential"`` or ``"cosine"``.
        steps_per_epoch: optimizer steps per epoch (the exponential decay's period).
        total_steps: optimizer steps of the whole run (the cosine's length).
        warmup_steps: steps of the linear warm-up (0: none).
        gamma: the exponential decay per epoch.
        min_lr_ratio: the cosine's final learning rate, as a fraction of the peak.

    Call :meth:`step` after every optimizer step; the learning rate of step ``s`` is set
    when the schedule is made (``s = 0``) and by the ``s``-th call.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, steps_per_epoch: int,
                 total_steps: int, warmup_steps: int = 0, gamma: float = 1.0,
                 min_lr_ratio: float = 0.0) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.optimizer, self.schedule = optimizer, schedule
        self.steps_per_epoch, self.total_steps = steps_per_epoch, max(total_steps, 1)
        self.warmup_steps, self.gamma, self.min_lr_ratio = warmup_steps, gamma, min_lr_ratio
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.done = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at step ``step`` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "exponential":
            return warm * self.gamma ** (step // self.steps_per_epoch)
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        m = self.min_lr_ratio
        return warm * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def _apply(self) -> None:
        f = self.factor(self.done)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def step(self) -> None:
        """One optimizer step done: set the learning rate of the next."""
        self.done += 1
        self._apply()

    def seek(self, step: int) -> None:
        """Set the learning rate of step ``step`` (``step`` steps done): a resumed run
        continues the schedule where its checkpoint stopped."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.done = step
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group for the coming step."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """``{"step": steps done}`` (everything else comes from the config)."""
        return {"step": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A per-epoch ``ExponentialLR`` state (checkpoints written
        before the per-step schedule: ``last_epoch`` epochs done) is read as that many
        whole epochs of steps."""
        if "step" in state:
            self.done = int(state["step"])
        elif "last_epoch" in state:
            self.done = int(state["last_epoch"]) * self.steps_per_epoch
        else:
            raise ValueError(f"not a learning-rate schedule state: keys {sorted(state)}")
        self._apply()
