"""End-to-end training on the micro config: learning, resume, determinism, evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from qcs.checkpoint import load_weights, read_metadata
from qcs.training import evaluate, train


def _weights(run):
    return load_weights(run / "last")


def _history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_epochs_learn(qcs_easy_config, tmp_path):
    cfg = qcs_easy_config
    result = train(cfg, tmp_path / "run", show_progress=False)
    hist = _history(tmp_path / "run")
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[1]["train_loss"] < hist[0]["train_loss"]       # the loss falls
    assert hist[1]["train_loss"] < math.log(3) - 0.05
    assert result.best_acc > 1 / 3 + 0.15                       # well above chance (33.3%)
    for name in ("last.safetensors", "last.json", "last.state.pt", "best.safetensors",
                 "best.json", "config.toml", "train.log", "loss_curves.png", "accuracy.png",
                 "confusion_best.png"):
        assert (tmp_path / "run" / name).is_file(), name
    meta = read_metadata(tmp_path / "run" / "best")
    assert meta["classes"] == ["blue", "green", "red"] and meta["epoch"] == result.best_epoch
    assert "epoch 2/2" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_resume_continues_exactly_and_deterministic(qcs_easy_config, tmp_path):
    cfg = qcs_easy_config
    cfg.train.deterministic = True
    cfg.train.max_steps_per_epoch = 4
    # the schedule's step count must survive the resume too: epoch 2 starts at step 4,
    # inside a 6-step warm-up, one epoch's decay in
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.lr_gamma = "exponential", 6, 0.5
    train(cfg, tmp_path / "full", show_progress=False)
    again = train(cfg, tmp_path / "again", show_progress=False)
    full = _weights(tmp_path / "full")
    for k, v in _weights(tmp_path / "again").items():        # --deterministic: identical
        assert torch.equal(v, full[k]), k
    cfg.train.epochs = 1
    train(cfg, tmp_path / "split", show_progress=False)
    resumed = train(cfg, tmp_path / "unused", resume=tmp_path / "split", epochs=2,
                    show_progress=False)
    assert resumed.run_dir == tmp_path / "split"
    for k, v in _weights(tmp_path / "split").items():
        assert torch.equal(v, full[k]), k
    h_full, h_split = _history(tmp_path / "full"), _history(tmp_path / "split")
    assert [h["epoch"] for h in h_split] == [1, 2]
    assert h_split[1]["lr"] == h_full[1]["lr"] == pytest.approx(cfg.optim.lr * 5 / 6 * 0.5)
    assert h_split[1]["test_acc"] == h_full[1]["test_acc"] == again.last["test_acc"]


def test_evaluate_metrics_against_hand_count():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class x[:, 0, 0, 0] among 3
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()
    preds = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    x = preds.view(-1, 1, 1, 1).expand(-1, 3, 2, 2).float()
    loader = torch.utils.data.DataLoader(list(zip(x, labels)), batch_size=3)
    ev = evaluate(Fixed(), loader, torch.device("cpu"), 3, show_progress=False)
    assert ev["confusion"] == [[2, 0, 0], [0, 1, 1], [1, 1, 2]]
    assert ev["acc"] == pytest.approx(5 / 8)
    assert ev["recall"] == pytest.approx([1.0, 0.5, 0.5])
    precision = [2 / 3, 1 / 2, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, [1.0, 0.5, 0.5])]
    assert ev["f1"] == pytest.approx(f1)
