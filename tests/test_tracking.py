"""Experiment trackers: the values written to CSV, TensorBoard and W&B (offline) are read
back from their files and compared with what was logged; resume drops rows past the
resume point."""

from __future__ import annotations

import csv
import math

import pytest

from qcs.errors import MissingDependency, UsageError
from qcs.tracking import (STEP_COLUMNS, StepClock, flatten, open_tracker, parse_trackers,
                          scalars)

CONFIG = {"model": {"heads": 2, "backbone_depths": [1, 1, 1]}, "optim": {"lr": 0.01},
          "data": {"balanced": None}}
STEPS = [(g, {"epoch": 1 + (g - 1) // 3, "step": 1 + (g - 1) % 3, "loss": 2.0 / g,
              "lr": 0.01 * 0.9 ** g, "images_per_s": 100.0 + g}) for g in range(1, 7)]
EPOCHS = [(1, 3, {"epoch": 1, "train_loss": 1.1, "test_acc": 0.5}),
          (2, 6, {"epoch": 2, "train_loss": 0.7, "test_acc": 0.75})]


def _feed(tracker, steps=STEPS, epochs=EPOCHS):
    tracker.start(flatten(CONFIG), "[model]\nheads = 2\n")
    for g, values in steps:
        tracker.log_step(g, values)
        for epoch, at, row in epochs:
            if at == g:
                tracker.log_epoch(epoch, g, row)
    tracker.close(epochs[-1][2] if epochs else {})


def test_parse_trackers():
    assert parse_trackers("tensorboard,csv") == ["tensorboard", "csv"]
    assert parse_trackers(" CSV , csv,wandb") == ["csv", "wandb"]
    assert parse_trackers("none") == [] and parse_trackers("") == []
    with pytest.raises(UsageError, match="--logger 'mlflow'"):
        parse_trackers("csv,mlflow")


def test_flatten_and_scalars():
    assert flatten(CONFIG) == {"model.heads": 2, "model.backbone_depths": "[1, 1, 1]",
                               "optim.lr": 0.01, "data.balanced": "none"}
    row = {"epoch": 3, "test_acc": 0.5, "test_recall": [0.1, 0.9], "cross": None, "ok": True}
    assert scalars(row) == {"epoch": 3.0, "test_acc": 0.5}


def test_step_clock_measures_items_per_second():
    clock = StepClock()
    clock.last -= 0.5  # as if the step took half a second
    assert clock.rate(100) == pytest.approx(200, rel=0.05)


def _read(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_tracker_writes_steps_and_epochs_and_resumes(tmp_path):
    _feed(open_tracker("csv", tmp_path))
    steps = _read(tmp_path / "steps.csv")
    assert list(steps[0]) == STEP_COLUMNS
    assert [int(r["global_step"]) for r in steps] == [g for g, _ in STEPS]
    for row, (g, values) in zip(steps, STEPS):
        for key, value in values.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12)
    epochs = _read(tmp_path / "metrics.csv")
    assert [(r["epoch"], r["global_step"], r["test_acc"]) for r in epochs] == [
        ("1", "3", "0.5"), ("2", "6", "0.75")]
    # resumed after epoch 1 (global step 3): later rows go, new ones follow
    again = open_tracker("csv", tmp_path, resume_step=3, resume_epoch=2)
    _feed(again, [(4, {**STEPS[3][1], "loss": 9.0})], [(2, 4, {"epoch": 2, "test_acc": 0.9})])
    steps = _read(tmp_path / "steps.csv")
    assert [int(r["global_step"]) for r in steps] == [1, 2, 3, 4]
    assert float(steps[-1]["loss"]) == 9.0
    assert [(r["epoch"], r["test_acc"]) for r in _read(tmp_path / "metrics.csv")] == [
        ("1", "0.5"), ("2", "0.9")]


def test_csv_columns_widen_when_a_row_brings_new_keys(tmp_path):
    tracker = open_tracker("csv", tmp_path)
    tracker.log_epoch(1, 3, {"test_acc": 0.5})
    tracker.log_epoch(2, 6, {"test_acc": 0.6, "val_acc": 0.4})
    rows = _read(tmp_path / "metrics.csv")
    assert rows[0]["val_acc"] == "" and rows[1]["val_acc"] == "0.4"


def test_tensorboard_tracker_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _feed(open_tracker("tensorboard", tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_s", "epoch/test_acc",
            "epoch/train_loss"} <= set(tags)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [g for g, _ in STEPS]
    assert all(math.isclose(v, values["loss"], rel_tol=1e-6) for (_, v), (_, values)
               in zip(loss, STEPS))
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("epoch/test_acc")] == [
        (3, 0.5), (6, 0.75)]
    assert "config/text_summary" in acc.Tags()["tensors"]
    hparams = [p for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")]
    assert hparams and any(b"model.heads" in p.read_bytes() for p in hparams)


def test_missing_packages_are_named(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependency, match="pip install tensorboard"):
        open_tracker("tensorboard", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingDependency, match="pip install wandb"):
        open_tracker("wandb", tmp_path)


def test_wandb_tracker_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    _feed(open_tracker("wandb", tmp_path))
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/images_per_s", b"epoch/test_acc",
                b"model.heads", b"optim.lr"):
        assert key in data, key
