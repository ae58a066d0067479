"""Every family's tiny preset learns from scratch: trained on a small slice of the built-in
data (its own network, optimizer, initialisation and schedule; only the data and the
number of epochs cut down), its training loss falls to at most half of the first epoch's.

Slow (about a minute per preset on one core): run with ``pytest -m slow``.
"""

from __future__ import annotations

import json

import pytest
from qcs.config import apply_overrides, load_config
from qcs.training import train

# (preset, extra overrides, epochs): the QCS family's three variants share the tiny preset.
# Every run sees the same number of images: 12 epochs of quadruplets (QCS), 24 of pairs
# (DCS), 48 of single images (baseline, DAN, PCD).
PRESETS = [
    ("tiny", [], 12),
    ("tiny", ['qcs.variant="dcs"'], 24),
    ("tiny", ['qcs.variant="baseline"'], 48),
    ("tiny-dan", [], 48),
    ("tiny-pcd", [], 48),
]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """The built-in data at its usual 100 px, 10 train / 4 test images per class."""
    from qcs.data import SynthParams, generate
    out = tmp_path_factory.mktemp("synth_small")
    return generate(out, SynthParams(seed=0, train_per_class=10, test_per_class=4, size=100))


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra, epochs", PRESETS,
                         ids=["qcs", "dcs", "baseline", "dan", "pcd"])
def test_tiny_preset_halves_its_training_loss(preset, extra, epochs, small_synth, tmp_path):
    cfg = apply_overrides(load_config(preset), [*extra,
        'data.format="raf-db"', f'data.root="{small_synth}"', "train.threads=1",
        "train.deterministic=true", f"train.epochs={epochs}", "train.batch_size=8"])
    train(cfg, tmp_path / "run", show_progress=False)
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    first, last = hist[0]["train_loss_base"], hist[-1]["train_loss_base"]
    assert last <= first / 2, [round(h["train_loss_base"], 3) for h in hist]
