"""Saving and restoring a run: ``last.*`` / ``best.*`` checkpoints with the metadata and
optimizer state a resume needs, ``metrics.jsonl`` and the PNG plots. Only rank 0 calls the
writers."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import plots
from ..atomic import atomic_write, write_text_atomic
from ..checkpoint import load_state, load_weights, read_metadata, save_checkpoint
from ..config import Config
from ..errors import CheckpointError
from .step import Optimization

__all__ = [
    "RunRecord",
    "plot_best_confusion",
    "read_history",
    "repair_best",
    "restore",
    "save_epoch",
    "selection_of",
    "write_history",
]

log = logging.getLogger("qcs")


@dataclass
class RunRecord:
    """What a checkpoint's metadata says about the run besides the weights: the config,
    class names, dataset root, the metrics of the epochs done and the best so far."""

    cfg: Config
    classes: list[str]
    root: str
    history: list[dict[str, Any]]
    best_acc: float = -1.0
    best_epoch: int = 0

    def meta(self, epoch: int, step: int, complete: bool) -> dict[str, Any]:
        """The checkpoint metadata at ``epoch`` after ``step`` steps."""
        done = self.history[-1] if self.history else {}
        return {"config": self.cfg.to_dict(), "classes": self.classes, "epoch": epoch,
                "step": step, "epoch_complete": complete,
                "metrics": {k: v for k, v in done.items() if not k.endswith("_confusion")},
                "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "data_root": self.root}


def selection_of(row: dict[str, Any]) -> str:
    """The split an epoch's metrics row was selected on: ``"val"`` or ``"test"`` (rows
    written before validation splits existed: test)."""
    return row.get("selected_on", "test")


def read_history(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """The metric rows of ``metrics.jsonl`` up to ``up_to_epoch`` (a torn line is dropped)."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # written atomically since the checkpoint rework; a torn line is from an older run
            log.warning("%s line %d is not JSON (a torn write?); dropped", path, n)
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` (atomically) by ``history``."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def restore(base: Path, model: nn.Module, opt: Optimization, step: int
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load checkpoint ``base`` into ``model`` and ``opt``; returns its metadata and its
    mid-epoch progress (None at an epoch's end; required when ``step > 0``)."""
    meta = read_metadata(base)
    save_id = meta.get("save_id")
    model.load_state_dict(load_weights(base, expect_epoch=meta["epoch"],
                                       expect_save_id=save_id))
    state = load_state(base, expect_save_id=save_id)
    opt.load_state_dict(state)
    progress = state.get("progress")
    if step and progress is None:
        raise CheckpointError(f"{base}.state.pt has no mid-epoch progress but its JSON "
                              f"says epoch {meta['epoch']} step {step}")
    log.info("resumed from %s (epoch %d%s) at epoch %d step %d", base, meta["epoch"],
             "" if meta.get("epoch_complete", True) else f", step {meta['step']}",
             meta["epoch"] + (1 if meta.get("epoch_complete", True) else 0), step + 1)
    return meta, progress


def save_epoch(run_dir: Path, model: nn.Module, record: RunRecord, opt: Optimization,
               epoch: int, steps: int, improved: bool) -> None:
    """At an epoch's end: metrics first (a resume drops rows newer than its checkpoint),
    then ``last.*``, then ``best.*`` when ``improved`` (a resume repairs a ``best.*`` that
    missed this save), then the plots."""
    write_history(run_dir, record.history)
    meta = record.meta(epoch, steps, True)
    save_checkpoint(run_dir / "last", model, meta, opt.state_dict())
    if improved:
        row = record.history[-1]
        save_checkpoint(run_dir / "best", model, meta)
        split = selection_of(row)
        plot_best_confusion(run_dir, row[f"{split}_confusion"], record.classes, epoch,
                            row[f"{split}_acc"])
    history = record.history
    atomic_write(run_dir / "loss_curves.png", lambda p: plots.plot_losses(history, p),
                 durable=False)
    atomic_write(run_dir / "accuracy.png", lambda p: plots.plot_accuracy(history, p),
                 durable=False)


def save_mid_epoch(run_dir: Path, model: nn.Module, record: RunRecord, opt: Optimization,
                   epoch: int, step: int, progress: dict[str, Any]) -> None:
    """``last.*`` in the middle of ``epoch`` after ``step`` steps, with ``progress`` (the
    epoch's running sums, its training time and every rank's RNG states)."""
    save_checkpoint(run_dir / "last", model, record.meta(epoch, step, False),
                    {**opt.state_dict(), "progress": progress})


def plot_best_confusion(run_dir: Path, confusion, classes: list[str], epoch: int,
                        acc: float) -> None:
    """``confusion_best.png``: the confusion matrix of the best epoch."""
    atomic_write(run_dir / "confusion_best.png", lambda p: plots.plot_confusion(
        confusion, classes, p, f"best epoch {epoch}: accuracy {100 * acc:.2f}%"),
        durable=False)


def repair_best(run_dir: Path, model: nn.Module, meta: dict[str, Any],
                history: list[dict[str, Any]], classes: list[str]) -> None:
    """``best.*`` is saved right after ``last.*``; a kill in between leaves ``best`` one
    improvement behind. When the checkpoint resumed from is itself the best epoch, write
    ``best.*`` from it (the weights just loaded)."""
    epoch = meta.get("best_epoch", 0)
    if not (epoch and meta.get("epoch_complete", True) and meta["epoch"] == epoch):
        return
    try:
        if read_metadata(run_dir / "best").get("epoch") == epoch:
            return
    except CheckpointError:
        pass  # missing (the first improvement was the save that got interrupted)
    save_checkpoint(run_dir / "best", model, {k: v for k, v in meta.items()
                                               if k not in ("format", "save_id")})
    log.info("best.* brought up to epoch %d (its save had been interrupted)", epoch)
    row = next((h for h in history if h["epoch"] == epoch), None)
    if row is not None:
        split = selection_of(row)
        plot_best_confusion(run_dir, row[f"{split}_confusion"], classes, epoch,
                            row[f"{split}_acc"])
