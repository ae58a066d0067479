"""The training loop: :func:`train` = set up a :class:`~qcs.training.epoch.Run` (resume
point, lock, logging, data, model, optimizer), then fit it epoch by epoch
(:func:`~qcs.training.epoch.train_one_epoch`, :func:`evaluate`, save).

A run directory holds ``config.toml`` (the resolved config, reusable with ``--config``),
``metrics.jsonl`` (one JSON object per epoch), ``train.log``, ``last.*`` and ``best.*``
checkpoints (see :mod:`qcs.checkpoint`) and PNG plots.

Reproducibility: everything random in epoch ``e`` (sampling, augmentation, dropout,
worker seeds) is seeded from ``(seed, e)`` at the start of the epoch, so ``--resume``
continues exactly as an uninterrupted run would, and ``train.deterministic = true`` (which
also asks torch for deterministic kernels) makes two runs give identical weights.

Interruptions: ``last.*`` is saved at every epoch end and, with ``train.checkpoint_every
= N``, every ``N`` steps; a mid-epoch checkpoint also holds the RNG states and the epoch's
running sums, so a resumed run (``data.num_workers = 0``) ends with bit-identical weights.
With ``handle_signals=True`` (the CLI), SIGINT / SIGTERM let the current step finish, save
``last.*`` and raise :class:`TrainingInterrupted` (the CLI exits 130 / 143); a second signal
acts as usual. A run killed before its first checkpoint restarts from its ``config.toml``
on ``--resume``.

Embedding: :func:`train` changes no process-wide state it was not asked to change. Torch's
thread count and deterministic mode are set only when the config asks
(``train.threads``, ``train.deterministic``) and are put back afterwards; signal handlers
are installed only with ``handle_signals=True``. It does seed the global RNGs (the run's
reproducibility depends on them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..checkpoint import load_weights
from ..config import Config, to_toml
from ..errors import ConfigError
from ..tracking import require as require_trackers
from ..distributed import DistContext, init_distributed
from ..families import build_model
from ..models.init import init_weights
from . import saving
from .data import Data, build_loaders, prepare_data
from .epoch import Callback, EpochStats, Run, interrupted, stop_requested, train_one_epoch
from .evaluation import evaluate
from .runstate import (
    ResumePoint,
    StopSignals,
    TrainingInterrupted,
    lock_run_dir,
    process_settings,
    resolve_device,
    resolve_resume,
    seed_everything,
)
from .saving import RunRecord
from .step import Optimization, TrainForward, TrainStep
from .tracked import Tracking

__all__ = ["Callback", "RunResult", "evaluate", "fit", "selection_split", "setup",
           "test_best_once", "train"]

log = logging.getLogger("qcs")


@dataclass
class RunResult:
    """The outcome of :func:`train`: the run directory, the best accuracy (on the selection
    split, :func:`selection_split`) and its epoch, the last epoch's metrics row and, when
    ``best.*`` was chosen on a validation split, the test metrics of ``best.*`` (the test
    split evaluated once, at the end)."""

    run_dir: Path
    best_acc: float
    best_epoch: int
    last: dict[str, Any]
    test: dict[str, Any] | None = None
    selected_on: str = "test"


def selection_split(cfg: Config, has_val: bool) -> str:
    """The split that picks ``best.*``: ``train.select_on`` (``auto``: the validation split
    when there is one, else the test split, as the paper's scripts do)."""
    if cfg.train.select_on == "val" and not has_val:
        raise ConfigError("train.select_on=val needs a validation split: set data.val_split "
                          "(--val-split official for FERPlus, or a fraction such as 0.1)")
    if cfg.train.select_on == "test" or not has_val:
        return "test"
    return "val"


def train(cfg: Config, run_dir: str | Path, *, resume: str | Path | None = None,
          cache_dir: str | None = None, show_progress: bool = True, epochs: int | None = None,
          callbacks: Sequence[Callback] = (), handle_signals: bool = False,
          loggers: Sequence[str] = ()) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (or continue the run of checkpoint ``resume``, whose
    saved config is used; ``epochs`` may then extend it). ``callbacks`` are called at each
    step's and epoch's end; ``handle_signals`` turns SIGINT / SIGTERM into a checkpoint and
    :class:`TrainingInterrupted`; ``loggers`` names experiment trackers (``csv``,
    ``tensorboard``, ``wandb``: see :mod:`qcs.tracking`) fed by rank 0. Returns the best
    test accuracy and the last epoch's metrics."""
    require_trackers(loggers)  # a missing package fails now, not after the data is ready
    lock = None
    try:
        point = ResumePoint()
        if resume is not None:
            main_rank = os.environ.get("RANK", "0") == "0"  # torchrun's env, before init
            cfg, run_dir, point, lock = resolve_resume(resume, owner=main_rank)
        if epochs is not None:
            cfg.train.epochs = epochs
        dctx = init_distributed(cfg.train.device)  # torchrun: DDP (see qcs.distributed)
        run_dir = Path(dctx.from_main(str(run_dir)))  # one directory, even if named by the time
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock is None and dctx.is_main:
            lock = lock_run_dir(run_dir)
        with _run_log(run_dir, dctx), StopSignals(handle_signals) as stop, \
                process_settings(cfg.train):
            for note in point.notes:
                log.info("%s", note)
            run = setup(cfg, run_dir, point, dctx, stop, cache_dir,
                         show_progress and dctx.is_main, list(callbacks))
            return _fit_tracked(run, point, loggers)
    finally:
        if lock is not None:
            lock.close()


def _fit_tracked(run: Run, point: ResumePoint, loggers: Sequence[str]) -> RunResult:
    """:func:`fit`, with the trackers ``loggers`` open on rank 0 while it runs."""
    if not loggers or not run.dctx.is_main:
        return fit(run, point)
    tracking = Tracking.open(loggers, run.cfg, run.run_dir, run.loaders.steps, point.epoch,
                             point.step)
    run.callbacks.append(tracking)
    try:
        return fit(run, point)
    finally:
        tracking.close()


@contextlib.contextmanager
def _run_log(run_dir: Path, dctx: DistContext) -> Iterator[None]:
    """Rank 0 also logs to ``run_dir/train.log`` (at INFO even if no one set up logging);
    other ranks log warnings only. Leaves the process group at the end."""
    level = log.level
    handler = None
    if dctx.is_main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.setLevel(logging.INFO)
        if level == logging.NOTSET:
            log.setLevel(logging.INFO)
        log.addHandler(handler)
    else:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
        dctx.shutdown()


def _resolve_classes(cfg: Config, data: Data) -> None:
    """``model.num_classes`` from the data (or checked against it); family settings that
    depend on class names."""
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(data.classes)
    elif cfg.model.num_classes != len(data.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the dataset has "
                         f"{len(data.classes)} classes {data.classes}")
    cfg.family.resolve(cfg.net, data.classes)


def _build_model(cfg: Config, fresh: bool, device: torch.device) -> torch.nn.Module:
    """The network with its initial weights (they depend on the seed only) and, for a
    fresh run, the pretrained weights the config names."""
    seed_everything(cfg.train.seed)
    model = init_weights(build_model(cfg), cfg.model.init)
    if fresh and cfg.train.pretrained:
        log.info("%s", cfg.family.load_pretrained(model, cfg.train.pretrained))
    if fresh:
        for report in cfg.family.load_extra_weights(model, cfg.net):
            log.info("%s", report)
    return model.to(device)


def setup(cfg: Config, run_dir: Path, point: ResumePoint, dctx: DistContext,
          stop: StopSignals, cache_dir: str | None, show_progress: bool,
          callbacks: list[Callback]) -> Run:
    """Data, model, optimizer, loaders and the record of the run (restored from
    ``point.checkpoint``, if any), written to ``run_dir`` by rank 0: the :class:`Run` that
    :func:`fit` trains."""
    seed_everything(cfg.train.seed)
    device = dctx.device if dctx.enabled else resolve_device(cfg.train.device)
    with dctx.main_first():  # rank 0 generates / checks cached data before the others read it
        data = prepare_data(cfg, cache_dir, show_progress)
    _resolve_classes(cfg, data)
    if dctx.is_main:
        write_text_atomic(run_dir / "config.toml", to_toml(cfg))
    model = _build_model(cfg, point.checkpoint is None, device)
    loaders = build_loaders(cfg, data, dctx, device)
    opt = Optimization.build(model, cfg, device, loaders.steps)
    resumed_meta = None
    if point.checkpoint is not None:
        resumed_meta, point.progress = saving.restore(point.checkpoint, model, opt, point.step)
        # the learning rate is a function of the steps done (also for checkpoints whose
        # scheduler counted epochs)
        opt.scheduler.seek((point.epoch - 1) * loaders.steps + point.step)
    log.info("%s, device %s, %s", cfg.family.describe(model, cfg.net, device), device,
             f"amp {cfg.train.amp}" if cfg.train.amp != "none" else "fp32")
    forward = dctx.wrap(TrainForward(model, cfg.family, cfg.net, device, cfg.train.amp))
    history = saving.read_history(run_dir / "metrics.jsonl", point.epoch - 1)
    record = RunRecord(cfg, list(data.classes), data.root, history, point.best_acc,
                       point.best_epoch)
    if dctx.is_main:
        saving.write_history(run_dir, history)
        if resumed_meta is not None:
            saving.repair_best(run_dir, model, resumed_meta, history, record.classes)
    return Run(cfg, run_dir, dctx, device, model, opt, TrainStep(model, forward, opt), loaders,
               record, stop, show_progress, callbacks)


def _metrics_row(run: Run, epoch: int, stats: EpochStats, ev: dict[str, Any],
                 split: str) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of an epoch (training sums averaged over ranks); ``ev`` is
    the evaluation of ``split`` (``val`` or ``test``), which selects ``best.*``."""
    tc, branches = run.cfg.train, run.branches
    sums = {**stats.sums, **run.dctx.mean_of({k: stats.sums[k] for k in ("loss", "base", "cross")})}
    n = max(stats.steps_done, 1)
    return {"epoch": epoch, "lr": stats.lr, "train_loss": sums["loss"] / n,
            "train_loss_base": sums["base"] / n,
            "train_loss_cross": sums["cross"] / n if branches > 1 else None,
            "train_time_s": round(stats.train_time, 2),
            "train_images_per_s": round(n * tc.batch_size * branches / stats.train_time, 1),
            f"{split}_loss": ev["loss"], f"{split}_acc": ev["acc"],
            f"{split}_mean_recall": ev["mean_recall"], f"{split}_recall": ev["recall"],
            f"{split}_f1": ev["f1"], f"{split}_confusion": ev["confusion"],
            "selected_on": split}


def _end_epoch(run: Run, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """Evaluate, record the metrics and save (rank 0)."""
    run.dctx.sync_buffers(run.model)  # rank 0's BN statistics everywhere
    split = selection_split(run.cfg, run.loaders.val is not None)
    loader = run.loaders.val if split == "val" else run.loaders.test
    ev = evaluate(run.model, loader, run.device, len(run.record.classes), run.cfg.train.amp,
                  run.show_progress, desc=f"{split} {epoch}/{run.cfg.train.epochs}",
                  reduce=run.dctx.all_reduce_sum if run.dctx.enabled else None)
    row = _metrics_row(run, epoch, stats, ev, split)
    rec = run.record
    rec.history.append(row)
    improved = ev["acc"] > rec.best_acc
    if improved:
        rec.best_acc, rec.best_epoch = ev["acc"], epoch
    if run.dctx.is_main:  # rank 0 alone writes metrics, checkpoints and plots
        saving.save_epoch(run.run_dir, run.model, rec, run.opt, epoch, stats.steps_done,
                          improved)
        _log_epoch(run, row)
    for cb in run.callbacks:
        cb.on_epoch_end(row)
    return row


def _log_epoch(run: Run, row: dict[str, Any]) -> None:
    rec, cross, split = run.record, row["train_loss_cross"], row["selected_on"]
    log.info("epoch %d/%d: train loss %.4f (base %.4f%s), %s loss %.4f, %s acc %.2f%% "
             "(best %.2f%% @%d), %.1f img/s", row["epoch"], run.cfg.train.epochs,
             row["train_loss"], row["train_loss_base"],
             f", cross {cross:.4f}" if cross is not None else "", split, row[f"{split}_loss"],
             split, 100 * row[f"{split}_acc"], 100 * rec.best_acc, rec.best_epoch,
             row["train_images_per_s"])


def test_best_once(run: Run) -> dict[str, Any]:
    """The test split, evaluated once: the weights of ``best.*`` (chosen on validation) on
    the test loader; written to ``test_best.json`` and logged."""
    run.dctx.barrier()  # rank 0 wrote best.*
    weights = load_weights(run.run_dir / "best", expect_epoch=run.record.best_epoch)
    run.model.load_state_dict(weights)
    ev = evaluate(run.model, run.loaders.test, run.device, len(run.record.classes),
                  run.cfg.train.amp, run.show_progress, desc="test (best, once)",
                  reduce=run.dctx.all_reduce_sum if run.dctx.enabled else None)
    result = {"epoch": run.record.best_epoch, "selected_on": "val", **ev}
    if run.dctx.is_main:
        write_text_atomic(run.run_dir / "test_best.json", json.dumps(result, indent=2))
    log.info("test split, evaluated once: best.* (epoch %d, chosen on the validation split) "
             "accuracy %.2f%%, mean recall %.2f%%", run.record.best_epoch, 100 * ev["acc"],
             100 * ev["mean_recall"])
    return result


def fit(run: Run, point: ResumePoint) -> RunResult:
    """Train from ``point`` to ``train.epochs``; returns the :class:`RunResult`."""
    epoch = point.epoch - 1
    last = run.record.history[-1] if run.record.history else {}
    signum = stop_requested(run)
    if signum is not None:  # signalled while loading: the checkpoint on disk is current
        raise interrupted(run, signum, point.epoch, point.step, saved=False)
    try:
        for epoch in range(point.epoch, run.cfg.train.epochs + 1):
            first = epoch == point.epoch
            stats = train_one_epoch(run, epoch, point.step if first else 0,
                                    point.progress if first else None)
            last = _end_epoch(run, epoch, stats)
            signum = stop_requested(run)
            if signum is not None:
                raise interrupted(run, signum, epoch, run.loaders.steps, saved=True)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: no save; the last checkpoint stands
        log.warning("interrupted in epoch %d; the last checkpoint is %s; continue with: qcs "
                    "train --resume %s", epoch, run.run_dir / "last", run.run_dir)
        raise
    split = selection_split(run.cfg, run.loaders.val is not None)
    test = test_best_once(run) if split == "val" and run.record.best_epoch > 0 else None
    if split == "test":
        log.info("best.* (epoch %d) was chosen on the test split, as the paper's scripts do: "
                 "its test accuracy is an optimistic estimate (data.val_split gives a "
                 "validation split to choose on)", run.record.best_epoch)
    return RunResult(run.run_dir, run.record.best_acc, run.record.best_epoch, last, test, split)
