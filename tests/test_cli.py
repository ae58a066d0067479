"""The qcs command: help, errors, data synth, and a full train / eval round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import QCS_MICRO_SET
from qcs.cli import build_parser, main


def test_help_lists_commands_and_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "data", "config"):
        assert cmd in out
    import argparse

    def check(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    check(sub, f"{name} {sub_name}")
            else:
                assert action.help, f"{name}: option {action.option_strings} has no help"
    check(build_parser(), "qcs")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--data", "--data-root", "--resume", "--deterministic", "--bias",
                "--pretrained", "--check-data", "--amp", "--device", "--set"):
        assert opt in out


def test_console_entry_point_runs():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "qcs", "config", "show", "paper-qcs"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'variant = "qcs"' in proc.stdout and "lr = 3e-06" in proc.stdout


def test_clear_errors(tmp_path, capsys):
    assert main(["train", "--config", "paper-qcs", "--out", str(tmp_path / "r")]) == 2
    assert "needs a dataset root: pass --data-root" in capsys.readouterr().err
    assert main(["train", "--data", "raf-db", "--data-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "RAF-DB label list not found" in capsys.readouterr().err
    assert main(["train", "--set", "qcs.widht=3"]) == 2
    assert "unknown key qcs.widht" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_check_data_reports_all_bad_images(qcs_micro_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "basic"
    shutil.copytree(qcs_micro_root, root)
    aligned = root / "Image" / "aligned"
    (aligned / "train_00003_aligned.jpg").unlink()
    (aligned / "test_00002_aligned.jpg").write_bytes(b"garbage")
    code = main(["train", "--data", "raf-db", "--data-root", str(root), "--check-data",
                 "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 unreadable images" in err
    assert "train_00003_aligned.jpg" in err and "test_00002_aligned.jpg" in err


def test_data_synth_command(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--train-per-class", "1",
                 "--test-per-class", "1", "--size", "24", "--quiet", "--bias"]) == 0
    assert "RAF-DB layout" in capsys.readouterr().out
    labels = (tmp_path / "basic" / "EmoLabel" / "list_patition_label.txt").read_text().split("\n")
    assert labels[0] == "train_00001.jpg 1" and len([x for x in labels if x]) == 14
    assert json.loads((tmp_path / "basic" / "synth.json").read_text())["bias"] is True


@pytest.mark.slow
def test_train_then_eval_round_trip(qcs_micro_root, tmp_path, capsys):
    sets = [a for s in QCS_MICRO_SET for a in ("--set", s)]
    run = tmp_path / "run"
    code = main(["train", "--data", "raf-db", "--data-root", str(qcs_micro_root), "--epochs", "1",
                 "--max-steps", "3", "--seed", "3", "--out", str(run), "--quiet", *sets])
    out = capsys.readouterr().out
    assert code == 0 and "test accuracy:" in out
    acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert f"test accuracy: {100 * acc:.2f}%" in out
    assert main(["eval", "--checkpoint", str(run / "best"), "--quiet", "--out",
                 str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"accuracy: {100 * acc:.2f}%" in out          # same number as the training eval
    for name in ("surprise", "neutral", "recall", "confusion"):
        assert name in out
    report = json.loads((tmp_path / "ev" / "eval_best_test.json").read_text())
    assert sum(map(sum, report["confusion"])) == 140
    assert (tmp_path / "ev" / "eval_best_test_confusion.png").stat().st_size > 1000
    # resume extends the run by one epoch
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
