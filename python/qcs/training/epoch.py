"""One training epoch (:func:`train_one_epoch`) and the run state it works on
(:class:`Run`): the pieces :func:`qcs.training.train` assembles in its setup."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..distributed import DistContext
from ..errors import RunFailed
from ..logs import progress as progress_bar
from . import saving
from .data import Loaders
from .runstate import (
    StopSignals,
    TrainingInterrupted,
    epoch_seed,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .saving import RunRecord
from .step import Optimization, TrainStep

__all__ = [
    "Callback",
    "EpochStats",
    "Run",
    "StepInfo",
    "interrupted",
    "stop_requested",
    "train_one_epoch",
]

log = logging.getLogger("qcs")


@dataclass
class StepInfo:
    """What :meth:`Callback.on_step_end` gets: the epoch, the step (1-based) of ``steps``,
    the step's loss and its parts, the learning rate it ran at and the images it took."""

    epoch: int
    step: int
    steps: int
    loss: float
    parts: dict[str, float]
    lr: float = math.nan
    items: int = 0


class Callback:
    """Hooks into :func:`qcs.training.train`; override what you need. Callbacks run on
    every rank (check ``torch.distributed`` for rank 0 if it matters)."""

    def on_step_end(self, info: StepInfo) -> None:
        """After each optimisation step."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """After each epoch's evaluation, with that epoch's row of ``metrics.jsonl``."""


@dataclass
class Run:
    """Everything a training run works on, built once by the setup and passed explicitly."""

    cfg: Config
    run_dir: Path
    dctx: DistContext
    device: torch.device
    model: nn.Module
    opt: Optimization
    step: TrainStep
    loaders: Loaders
    record: RunRecord
    stop: StopSignals
    show_progress: bool = True
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def branches(self) -> int:
        """Images per sampled tuple."""
        return self.cfg.family.data_needs(self.cfg.net).branches


@dataclass
class EpochStats:
    """The running sums of an epoch (``loss``, ``base``, ``cross`` losses), the steps done,
    the training time and the learning rate it ran at."""

    sums: dict[str, float]
    steps_done: int
    train_time: float
    lr: float


def stop_requested(run: Run) -> int | None:
    """The signal to stop for, agreed by all ranks (they must stop at the same step)."""
    local = run.stop.signum
    if not run.dctx.enabled:
        return local
    flag = run.dctx.all_reduce_sum(torch.tensor([float(local or 0)], device=run.device))
    return (local or signal.SIGTERM) if float(flag) > 0 else None


def interrupted(run: Run, signum: int, epoch: int, step: int, saved: bool
                ) -> TrainingInterrupted:
    """The exception that ends a run stopped by ``signum`` (logged once, by rank 0)."""
    name = signal.Signals(signum).name
    where = (f"epoch {epoch} step {step}" if step < run.loaders.steps
             else f"the end of epoch {epoch}")
    if saved:
        what = f"checkpoint saved at {where} in {run.run_dir / 'last'}"
    elif (run.run_dir / "last.json").exists():
        what = f"nothing new since the checkpoint in {run.run_dir / 'last'}"
    else:
        what = "no checkpoint yet"
    msg = f"stopped by {name}: {what}; continue with: qcs train --resume {run.run_dir}"
    if run.dctx.is_main:  # the other ranks stopped at the same step; one report suffices
        log.warning("%s", msg)
    return TrainingInterrupted(signum, msg)


def save_mid_epoch(run: Run, epoch: int, step: int, stats: EpochStats) -> None:
    """``last.*`` after ``step`` steps of ``epoch``, with every rank's RNG states."""
    rng = [rng_state(run.device)]
    if run.dctx.enabled:  # every rank's own augmentation / dropout stream
        import torch.distributed as dist
        rng = [None] * run.dctx.world
        dist.all_gather_object(rng, rng_state(run.device))
    if run.dctx.is_main:
        saving.save_mid_epoch(run.run_dir, run.model, run.record, run.opt, epoch, step,
                              {"sums": dict(stats.sums), "train_time_s": stats.train_time,
                               "lr": stats.lr, "rng": rng})


def _begin(run: Run, epoch: int, start_step: int, progress: dict[str, Any] | None
           ) -> tuple[int, EpochStats]:
    """Seed the epoch and, when it continues a mid-epoch checkpoint, restore its sums and
    RNG states; returns the steps to skip and the starting stats."""
    es = epoch_seed(run.cfg.train.seed, epoch)
    seed_everything(es + run.dctx.rank)  # augmentation and dropout (own per rank)
    run.loaders.generator.manual_seed(es)  # worker seeds of this epoch
    run.loaders.sampler.set_epoch(epoch)
    run.model.train()
    stats = EpochStats({"loss": 0.0, "base": 0.0, "cross": 0.0}, 0, 0.0, run.opt.lr)
    skip = 0
    if start_step and progress is not None:  # continue a mid-epoch checkpoint
        skip = min(start_step, run.loaders.steps)
        stats.sums.update(progress["sums"])
        stats.train_time = float(progress.get("train_time_s", 0.0))
        # the epoch's learning rate is its first step's, not the resumed step's (warm-up)
        stats.lr = float(progress.get("lr", stats.lr))
        rng = progress["rng"]
        if len(rng) == run.dctx.world:
            set_rng_state(rng[run.dctx.rank], run.device)
        else:  # other process count: the rest of the epoch draws a new random stream
            log.warning("the checkpoint holds RNG states of %d processes, this run has %d: the "
                        "rest of epoch %d is not bit-identical to an uninterrupted run",
                        len(rng), run.dctx.world, epoch)
            seed_everything(es + run.dctx.rank + 7919 * skip)
    run.loaders.sampler.skip = skip * run.cfg.train.batch_size
    stats.steps_done = skip
    return skip, stats


def _non_finite(run: Run, loss: float, epoch: int, step: int) -> str:
    """The one-line report of a loss that stopped being finite, with what to try."""
    tc = run.cfg.train
    tips = [f"a lower --lr (this run: {run.opt.lr:g})"]
    if tc.amp != "none":
        tips.append(f"--amp none (this run: {tc.amp})")
    tips.append("a larger --batch-size")
    return (f"the training loss is {loss} at epoch {epoch} step {step}; try "
            + ", ".join(tips[:-1]) + f" or {tips[-1]}")


def train_one_epoch(run: Run, epoch: int, start_step: int = 0,
                    progress: dict[str, Any] | None = None) -> EpochStats:
    """Train ``epoch`` (from step ``start_step + 1`` with the ``progress`` of a mid-epoch
    checkpoint). Saves ``last.*`` every ``train.checkpoint_every`` steps; after a stop
    signal, saves and raises :class:`TrainingInterrupted`."""
    tc, steps = run.cfg.train, run.loaders.steps
    skip, stats = _begin(run, epoch, start_step, progress)
    per_step = tc.batch_size * run.branches
    bar = progress_bar(steps * per_step, f"epoch {epoch}/{tc.epochs}", initial=skip * per_step,
                       enabled=run.show_progress)
    t0 = time.perf_counter() - stats.train_time
    for step, (x, y) in enumerate(run.loaders.train if skip < steps else (), skip + 1):
        if step > steps:
            break
        # [B, R, ...] from the loader -> branch-major [R, B, ...]
        xs = x.transpose(0, 1).to(run.device, non_blocking=True)
        ys = y.transpose(0, 1).to(run.device)
        losses = run.step(xs, ys)
        loss = float(losses.total.detach())
        if not math.isfinite(loss):
            bar.close()
            raise RunFailed(_non_finite(run, loss, epoch, step))
        stats.sums["loss"] += loss
        stats.sums["base"] += losses.parts["base"]
        stats.sums["cross"] += losses.parts.get("cross", 0.0)
        stats.steps_done = step
        items = xs.shape[0] * xs.shape[1]
        bar.set_postfix(loss=f"{stats.sums['loss'] / step:.4f}", refresh=False)
        bar.update(items)
        for cb in run.callbacks:
            cb.on_step_end(StepInfo(epoch, step, steps, loss, losses.parts, run.opt.lr, items))
        signum = stop_requested(run)
        if signum is not None:
            bar.close()
            stats.train_time = time.perf_counter() - t0
            save_mid_epoch(run, epoch, step, stats)
            raise interrupted(run, signum, epoch, step, saved=True)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < steps:
            stats.train_time = time.perf_counter() - t0
            save_mid_epoch(run, epoch, step, stats)
    bar.close()
    stats.train_time = time.perf_counter() - t0
    return stats
