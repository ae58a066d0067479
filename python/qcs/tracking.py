"""Experiment tracking: per-step and per-epoch values of a training run sent to CSV files,
TensorBoard or Weights & Biases (several at once).

``metrics.jsonl`` stays the run's durable record (resume reads it); the trackers are views
of the same numbers for the usual tools:

- ``csv`` (no extra package): ``steps.csv`` (one row per optimisation step: global step,
  epoch, step, loss, learning rate, images per second) and ``metrics.csv`` (one row per
  epoch: the scalar columns of ``metrics.jsonl``) in the run directory.
- ``tensorboard`` (``pip install tensorboard``, the ``tensorboard`` extra): event files in
  ``RUN/tensorboard`` through :mod:`torch.utils.tensorboard`: ``train/loss``, ``train/lr``,
  ``train/images_per_s`` per step, ``epoch/<column>`` per epoch (x axis: the global step),
  the resolved config as text and as hyper-parameters beside the final metrics.
- ``wandb`` (``pip install wandb``, the ``wandb`` extra): a W&B run in ``RUN/wandb`` with the
  resolved config as its config and the same values; ``WANDB_MODE=offline`` keeps it local,
  ``WANDB_PROJECT`` names the project (default ``qcs``).

A resumed run continues the global step; the CSV files drop rows past the resume point and
TensorBoard purges events past it.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import MissingDependency, UsageError

__all__ = ["TRACKERS", "parse_trackers", "require", "flatten", "scalars", "Tracker", "CsvTracker",
           "TensorBoardTracker", "WandbTracker", "open_tracker", "StepClock"]

TRACKERS = ("csv", "tensorboard", "wandb")
STEP_COLUMNS = ["global_step", "epoch", "step", "loss", "lr", "images_per_s"]
# tracker -> (module it needs, the message when that is missing)
_NEEDS = {
    "tensorboard": ("torch.utils.tensorboard", "--logger tensorboard needs the tensorboard "
                    "package: pip install tensorboard (the qcs-ext 'tensorboard' extra)"),
    "wandb": ("wandb", "--logger wandb needs the wandb package: pip install wandb (the "
              "qcs-ext 'wandb' extra)"),
}


def require(names: Sequence[str]) -> None:
    """Raise :class:`MissingDependency` now (before a run starts) if a tracker in
    ``names`` lacks its package."""
    for name in names:
        if name in _NEEDS:
            _import(name)


def _import(name: str):
    module, message = _NEEDS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(message) from None


def parse_trackers(text: str | Sequence[str]) -> list[str]:
    """``"tensorboard,csv"`` (or a list of names; ``none`` or empty: no tracker) -> the
    names, in order, without repeats. Raises :class:`UsageError` naming an unknown one."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in (p.strip().lower() for p in parts):
        if part in ("", "none"):
            continue
        if part not in TRACKERS:
            raise UsageError(f"--logger {part!r}: choose from {', '.join(TRACKERS)} (comma-"
                             "separated, e.g. --logger tensorboard,csv) or none")
        if part not in names:
            names.append(part)
    return names


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"heads": 8}}`` -> ``{"model.heads": 8}``; lists become strings and
    ``None`` becomes ``"none"`` (the types hyper-parameter tables take)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        elif value is None:
            out[name] = "none"
        else:
            out[name] = value
    return out


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite-or-not scalar entries of a metrics row (lists such as the
    per-class recall and the confusion matrix, and ``None`` values, are left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class StepClock:
    """Images per second of each step, from the wall time since the previous step (or
    since :meth:`restart`, called at each epoch's start)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def restart(self) -> None:
        """Start timing afresh (the time between epochs is evaluation, not training)."""
        self.last = time.perf_counter()

    def rate(self, items: int) -> float:
        """``items`` over the seconds since the last call; restarts the clock."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return items / seconds if seconds > 0 else math.nan


class Tracker:
    """One destination; :func:`open_tracker` makes them. ``start`` gets the flattened
    config, ``log_step`` a row of ``STEP_COLUMNS``, ``log_epoch`` the epoch's scalars."""

    def start(self, hparams: dict[str, Any], config_text: str) -> None:
        """Record the resolved config (``hparams`` flattened, ``config_text`` as TOML)."""

    def log_step(self, global_step: int, values: dict[str, float]) -> None:
        """One optimisation step's values."""

    def log_epoch(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        """One epoch's scalar metrics, at the global step that ended it."""

    def close(self, final: dict[str, float]) -> None:
        """Flush and release; ``final`` are the last epoch's scalars (may be empty)."""


class _CsvTable:
    """A CSV file with a header; rows are appended, and a row with new columns rewrites the
    file with the wider header."""

    def __init__(self, path: Path, columns: list[str], keep: Any = None) -> None:
        self.path, self.columns = path, list(columns)
        rows: list[dict[str, str]] = []
        if keep is not None and path.is_file():
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns += [c for c in reader.fieldnames or [] if c not in self.columns]
                rows = [r for r in reader if keep(r)]
        self._rewrite(rows)

    def _rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` (missing columns empty)."""
        new = [k for k in row if k not in self.columns]
        if new:
            with self.path.open(newline="") as fh:
                old = list(csv.DictReader(fh))
            self.columns += new
            self._rewrite(old)
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, self.columns, restval="").writerow(row)


def _before(column: str, limit: int):
    """A row filter keeping rows whose integer ``column`` is below ``limit``."""
    def keep(row: dict[str, str]) -> bool:
        try:
            return int(float(row.get(column) or 0)) < limit
        except ValueError:
            return False
    return keep


class CsvTracker(Tracker):
    """``steps.csv`` and ``metrics.csv`` in the run directory (no extra package)."""

    def __init__(self, run_dir: Path, resume_step: int, resume_epoch: int) -> None:
        keep = resume_step > 0 or resume_epoch > 1
        self.steps = _CsvTable(run_dir / "steps.csv", STEP_COLUMNS,
                               _before("global_step", resume_step + 1) if keep else None)
        self.epochs = _CsvTable(run_dir / "metrics.csv", ["epoch", "global_step"],
                                _before("epoch", resume_epoch) if keep else None)

    def log_step(self, global_step: int, values: dict[str, float]) -> None:
        self.steps.append({"global_step": global_step, **values})

    def log_epoch(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        self.epochs.append({**values, "epoch": epoch, "global_step": global_step})


class TensorBoardTracker(Tracker):
    """Event files in ``run_dir/tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        SummaryWriter = _import("tensorboard").SummaryWriter
        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_step
                                    else None)
        self.hparams: dict[str, Any] = {}

    def start(self, hparams: dict[str, Any], config_text: str) -> None:
        self.hparams = hparams
        self.writer.add_text("config", "```toml\n" + config_text + "\n```", 0)

    def log_step(self, global_step: int, values: dict[str, float]) -> None:
        for key in ("loss", "lr", "images_per_s"):
            if key in values and math.isfinite(values[key]):
                self.writer.add_scalar(f"train/{key}", values[key], global_step)

    def log_epoch(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, global_step)

    def close(self, final: dict[str, float]) -> None:
        if final and self.hparams:
            metrics = {f"hparam/{k}": v for k, v in final.items() if k != "epoch"}
            self.writer.add_hparams(self.hparams, metrics, run_name=".")
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in ``run_dir/wandb`` (needs the ``wandb`` package)."""

    def __init__(self, run_dir: Path) -> None:
        self.wandb, self.run_dir, self.run = _import("wandb"), run_dir, None

    def start(self, hparams: dict[str, Any], config_text: str) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "qcs"),
                                   name=self.run_dir.name, dir=str(self.run_dir),
                                   config=hparams, reinit="finish_previous")

    def log_step(self, global_step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in values.items()}, step=global_step)

    def log_epoch(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({f"epoch/{k}": v for k, v in values.items()}, step=global_step)

    def close(self, final: dict[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(final)
            self.run.finish()
            self.run = None
            # finish() may return before the service has written the run file; teardown
            # waits for it (a later wandb.init starts the service again)
            self.wandb.teardown()


def open_tracker(name: str, run_dir: Path, resume_step: int = 0, resume_epoch: int = 1
                 ) -> Tracker:
    """The tracker called ``name`` (one of :data:`TRACKERS`) writing under ``run_dir``;
    ``resume_step`` / ``resume_epoch``: where a resumed run continues (0 / 1 for a new
    run). Raises :class:`MissingDependency` when its package is not installed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if name == "csv":
        return CsvTracker(run_dir, resume_step, resume_epoch)
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, resume_step)
    if name == "wandb":
        return WandbTracker(run_dir)
    raise UsageError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
