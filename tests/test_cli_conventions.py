"""What a user meets at the command line: ``--version``, logs on stderr (stdout keeps only
the result), ``-q`` / ``-v``, one-line errors with exit 2 (1 for a failed run) instead of
tracebacks, ``qcs eval``'s own options, ``qcs predict`` streaming its output, and the
experiment trackers of ``qcs train --logger``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcs
from qcs.cli import build_parser, main

from conftest import QCS_MICRO_SET
from use_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _sets(extra: list[str] = ()) -> list[str]:
    out: list[str] = []
    for item in [*QCS_MICRO_SET, *extra]:
        out += ["--set", item]
    return out


def _train_args(root, out, *extra) -> list[str]:
    return ["train", "--data", "raf-db", "--data-root", str(root), "--epochs", "1",
            "--max-steps", "3", "--out", str(out), *_sets(), *extra]


def _qcs(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m qcs ARGS`` in a fresh process (the console script's behaviour)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]),
               OMP_NUM_THREADS="1", QCS_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "qcs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"qcs {qcs.__version__} (qcs-ext)") and out.count("\n") == 1
    assert f"torch {torch.__version__}" in out and "native kernels" in out


def test_missing_device_is_one_line_and_exit_2(tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = _qcs("train", "--device", "cuda:7", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("qcs train: error: --device cuda:7:"), out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("name", ["cuda:x", "tpu", "cpu:1"])
def test_malformed_device_names(name, capsys):
    assert main(["train", "--device", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {name}" in err


def test_logs_go_to_stderr_and_stdout_keeps_the_result(qcs_micro_root, tmp_path):
    out = _qcs(*_train_args(qcs_micro_root, tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("test accuracy: ") and out.stdout.count("\n") == 1
    assert "epoch 1/1" in out.stderr and "run directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_quiet_and_verbose(qcs_micro_root, tmp_path, capsys):
    assert main(_train_args(qcs_micro_root, tmp_path / "q", "-q")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("test accuracy: ")
    assert main(_train_args(qcs_micro_root, tmp_path / "v", "-v")) == 0
    verbose = capsys.readouterr().err
    assert main(_train_args(qcs_micro_root, tmp_path / "n")) == 0
    normal = capsys.readouterr().err
    assert "epoch 1/1" in normal and "debug:" not in normal
    assert "resolved config" in verbose and "resolved config" not in normal


def test_loggers_write_tensorboard_and_csv(qcs_micro_root, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert main(_train_args(qcs_micro_root, run, "--logger", "tensorboard,csv", "-q")) == 0
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    with (run / "steps.csv").open() as fh:
        steps = list(csv.DictReader(fh))
    assert [int(r["global_step"]) for r in steps] == [1, 2, 3]
    assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) > 0 for r in steps)
    with (run / "metrics.csv").open() as fh:
        (epoch,) = list(csv.DictReader(fh))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert float(epoch["test_acc"]) == pytest.approx(row["test_acc"])
    assert float(epoch["train_loss"]) == pytest.approx(row["train_loss"])
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)
    assert acc.Scalars("epoch/test_acc")[0].value == pytest.approx(row["test_acc"], rel=1e-6)
    assert main(_train_args(qcs_micro_root, tmp_path / "x", "--logger", "mlflow")) == 2
    assert "--logger 'mlflow'" in capsys.readouterr().err


def test_class_count_mismatch_is_one_line(qcs_micro_root, tmp_path, capsys):
    code = main(_train_args(qcs_micro_root, tmp_path / "run", "-q")
                + ["--set", "model.num_classes=5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_classes=5" in err[0] and "7 classes" in err[0]


def test_eval_class_mismatch_is_one_line(qcs_micro_root, qcs_easy_root, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")  # 7 RAF-DB classes
    code = main(["eval", "--checkpoint", str(ckpt), "--data", "folder", "--data-root",
                 str(qcs_easy_root), "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcs eval: error:") and "classes" in err[0]


def test_non_finite_loss_fails_the_run_in_one_line(qcs_micro_root, tmp_path, capsys,
                                                   monkeypatch):
    from qcs.training import step as step_module
    real = step_module.TrainStep.__call__

    def poisoned(self, xs, ys):
        losses = real(self, xs, ys)
        losses.total = losses.total * float("nan")
        return losses
    monkeypatch.setattr(step_module.TrainStep, "__call__", poisoned)
    assert main(_train_args(qcs_micro_root, tmp_path / "run", "-q")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcs train: error: the training loss is nan")
    assert "epoch 1 step 1" in err[0] and "--lr" in err[0]


def test_eval_offers_only_its_own_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    options = {s for a in sub._actions for s in a.option_strings}
    for option in ("--bias", "--bias-strength", "--balanced", "--synth-seed", "--lr",
                   "--epochs"):
        assert option not in options, option
    assert {"--checkpoint", "--split", "--out", "--device", "--data", "--data-root",
            "--batch-size", "-q", "-v"} <= options
    help_text = sub.format_help()
    assert "eval_<checkpoint>_<split>.json" in help_text
    assert "eval_<checkpoint>_<split>_confusion.png" in help_text
    batch = next(a for a in sub._actions if "--batch-size" in a.option_strings)
    assert "images" in batch.help and "quadruplet" not in batch.help


def test_predict_defaults_to_auto_device():
    parser = build_parser()
    args = parser.parse_args(["predict", "--checkpoint", "x", "img.png"])
    assert args.device == "auto"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_predict_streams_records_as_they_come(fmt, tmp_path, monkeypatch, capsys):
    """Each record is in the output file before the next image is processed."""
    from PIL import Image

    from qcs import predict as predict_module
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(tmp_path / f"c{i}.png")
    out = tmp_path / f"pred.{fmt}"
    real_run = predict_module.Predictor.run
    seen: list[int] = []

    def run(self, paths):
        for i, rec in enumerate(real_run(self, paths)):
            if i:  # the previous record must already be on disk
                text = out.read_text()
                seen.append(text.count("c0.png") + text.count("c1.png") + text.count("c2.png"))
            yield rec
    monkeypatch.setattr(predict_module.Predictor, "run", run)
    files = [str(tmp_path / f"c{i}.png") for i in range(3)]
    assert main(["predict", "--checkpoint", str(ckpt), "--no-detect", "--batch-size", "1",
                 "-o", str(out), *files]) == 0
    assert seen == [1, 2]
    text = out.read_text()
    if fmt == "json":
        assert [r["file"] for r in json.loads(text)] == files
    elif fmt == "jsonl":
        assert [json.loads(line)["file"] for line in text.splitlines()] == files
    else:
        assert [r["file"] for r in csv.DictReader(text.splitlines())] == files
