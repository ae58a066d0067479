"""The bridge from the training loop to the experiment trackers of :mod:`qcs.tracking`:
a :class:`~qcs.training.epoch.Callback` that turns each step into a row of loss, learning
rate and throughput at a global step, and each epoch's metrics into scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import Config, to_toml
from ..tracking import StepClock, Tracker, flatten, open_tracker, scalars
from .epoch import Callback, StepInfo

__all__ = ["Tracking"]


class Tracking(Callback):
    """Sends a run's values to ``trackers``. ``steps_per_epoch`` numbers the global steps
    (``(epoch - 1) * steps_per_epoch + step``); :meth:`close` flushes them with the last
    epoch's scalars (hyper-parameter tables pair them with the config)."""

    def __init__(self, trackers: Sequence[Tracker], steps_per_epoch: int) -> None:
        self.trackers = list(trackers)
        self.steps_per_epoch = steps_per_epoch
        self.clock = StepClock()
        self.last: dict[str, float] = {}

    @classmethod
    def open(cls, names: Sequence[str], cfg: Config, run_dir: Path, steps_per_epoch: int,
             epoch: int, step: int) -> "Tracking":
        """Open the trackers ``names`` in ``run_dir`` for a run starting at ``epoch``,
        ``step`` (1, 0 for a fresh run) and record the resolved ``cfg``."""
        resume_step = (epoch - 1) * steps_per_epoch + step
        trackers = [open_tracker(n, run_dir, resume_step, epoch) for n in names]
        for tracker in trackers:
            tracker.start(flatten(cfg.to_dict()), to_toml(cfg))
        return cls(trackers, steps_per_epoch)

    def on_step_end(self, info: StepInfo) -> None:
        values = {"epoch": info.epoch, "step": info.step, "loss": info.loss, "lr": info.lr,
                  "images_per_s": self.clock.rate(info.items)}
        at = (info.epoch - 1) * self.steps_per_epoch + info.step
        for tracker in self.trackers:
            tracker.log_step(at, values)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self.last = scalars(metrics)
        epoch = int(metrics["epoch"])
        for tracker in self.trackers:
            tracker.log_epoch(epoch, epoch * self.steps_per_epoch, self.last)
        self.clock.restart()  # evaluation time is not training throughput

    def close(self) -> None:
        """Flush and release every tracker."""
        for tracker in self.trackers:
            tracker.close(self.last)
