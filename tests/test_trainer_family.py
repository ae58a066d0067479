"""A sixth model family: the example of docs/architecture.md, run as written, registers,
configures, trains for a step through qcs.training.train, and loads back for inference."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from qcs import families
from qcs.config import ConfigError, config_from_dict, to_toml
from qcs.inference import load_model
from qcs.training import Callback, train

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example_source() -> str:
    section = DOC.read_text().split("## Adding a family", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def smallcnn(monkeypatch):
    """Run the documented module; the registration is undone afterwards."""
    monkeypatch.setattr(families, "_loaded", dict(families._loaded))
    module = types.ModuleType("smallcnn_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(_example_source(), str(DOC), "exec"), module.__dict__)
    return module


class _Recorder(Callback):
    def __init__(self) -> None:
        self.steps, self.epochs = [], []

    def on_step_end(self, info) -> None:
        self.steps.append((info.epoch, info.step, info.loss))

    def on_epoch_end(self, metrics) -> None:
        self.epochs.append(metrics)


def test_example_family_registers_and_configures(smallcnn, qcs_micro_config):
    assert "smallcnn" in families.family_names()
    assert families.get_family("smallcnn") is smallcnn.FAMILY
    cfg = config_from_dict({"model": {"family": "smallcnn"}, "smallcnn": {"width": 4}},
                           "test", qcs_micro_config).validate()
    assert isinstance(cfg.net, smallcnn.SmallCNNConfig) and cfg.net.width == 4
    assert "[smallcnn]\nwidth = 4" in to_toml(cfg)
    with pytest.raises(ConfigError, match=r"smallcnn.width must be >= 1, got 0"):
        config_from_dict({"smallcnn": {"width": 0}}, "test", cfg).validate()
    with pytest.raises(ConfigError, match=r"\[qcs\] is the section of the qcs family"):
        config_from_dict({"qcs": {"dropout": 0.1}}, "test", cfg)


def test_example_family_trains_a_step_and_loads(smallcnn, qcs_micro_config, tmp_path):
    cfg = config_from_dict({"model": {"family": "smallcnn"}, "smallcnn": {"width": 4},
                            "train": {"epochs": 1, "max_steps_per_epoch": 1},
                            "optim": {"sam": False}}, "test", qcs_micro_config).validate()
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in families.build_model(
        config_from_dict({"model": {"num_classes": 7}}, "test", cfg)).state_dict().items()}
    rec = _Recorder()
    result = train(cfg, tmp_path / "run", show_progress=False, callbacks=[rec])
    assert [(e, s) for e, s, _ in rec.steps] == [(1, 1)]
    assert len(rec.epochs) == 1 and rec.epochs[0]["epoch"] == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["train_loss"] == pytest.approx(rec.steps[0][2])
    assert row["test_acc"] == result.last["test_acc"]
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded.model, smallcnn.SmallCNN)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step changed it
    assert loaded.model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
