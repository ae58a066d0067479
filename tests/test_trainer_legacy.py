"""Checkpoints written before the per-family config sections (one flat ``[model]`` section
and a ``[loss]`` section in their JSON) still load, evaluate and resume."""

from __future__ import annotations

import json

import pytest
import torch
from qcs.checkpoint import read_metadata, save_checkpoint
from qcs.config import ConfigError, config_from_dict, upgrade_legacy
from qcs.families import build_model
from qcs.inference import load_model

CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]

# Config.to_dict() of the flat layout, as the trainer wrote it into checkpoints: the micro
# QCS network and a micro DAN network (note the QCS field "heads": 4 beside DAN's own
# "dan_heads": 3, and the [loss] section)
_SHARED = {
    "data": {"format": "synth", "root": "", "train_list": "", "test_list": "", "image_size": 32,
             "balanced": None, "cache_in_memory": True, "num_workers": 0, "check": False,
             "skip_bad": False, "synth_seed": 0, "synth_train_per_class": 200,
             "synth_test_per_class": 100, "synth_size": 100, "synth_bias": False,
             "synth_bias_strength": 0.9},
    "optim": {"name": "adam", "lr": 0.0003, "weight_decay": 0.0001, "momentum": 0.9,
              "sam": True, "sam_rho": 0.05, "sam_adaptive": False, "lr_gamma": 0.95},
    "loss": {"distill": "kl", "distill_weight": 0.5, "temperature": 2.0, "affinity_weight": 1.0,
             "partition_weight": 0.5, "neaa_weight": 0.01},
    "train": {"epochs": 2, "batch_size": 16, "seed": 0, "deterministic": False, "device": "auto",
              "amp": "none", "threads": 0, "pretrained": "", "max_steps_per_epoch": 0,
              "checkpoint_every": 0},
}
_FLAT_MODEL = {
    "variant": "qcs", "num_classes": 7, "backbone_depths": [1, 1, 1],
    "backbone_widths": [8, 8, 16], "backbone_size": 32, "embed_dim": 16, "tokens_side": 4,
    "vit_depth": 1, "vit_cross_depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0,
    "attn_dropout": 0.0, "csa_gamma": 1.0, "csa_mode": "sd", "csa_scope": "batch",
    "backend": "reference", "resnet_layers": [2, 2, 2, 2], "resnet_widths": [64, 128, 256, 512],
    "dan_heads": 4, "landmarks": "heatmap", "heatmap_channels": 3,
    "landmark_widths": [64, 64, 128], "landmark_weights": "", "neutral_class": -1}
LEGACY_QCS = {"model": {"family": "qcs", **_FLAT_MODEL}, **_SHARED}
LEGACY_DAN = {"model": {**_FLAT_MODEL, "family": "dan", "heads": 4, "backbone_size": 56,
                        "resnet_layers": [1, 1, 1, 1], "resnet_widths": [8, 8, 16, 16],
                        "dan_heads": 3}, **_SHARED}


def test_upgrade_maps_the_flat_layout_onto_family_sections():
    cfg = config_from_dict(upgrade_legacy(LEGACY_QCS), "legacy").validate()
    assert (cfg.model.family, cfg.model.num_classes) == ("qcs", 7)
    net = cfg.net
    assert (net.variant, net.backbone_widths, net.embed_dim, net.tokens_side, net.heads) == (
        "qcs", [8, 8, 16], 16, 4, 2)
    assert (net.distill, net.distill_weight, net.temperature) == ("kl", 0.5, 2.0)
    assert cfg.optim.lr == 0.0003 and cfg.data.balanced is None
    dan = config_from_dict(upgrade_legacy(LEGACY_DAN), "legacy").validate()
    assert dan.model.family == "dan"
    assert (dan.net.heads, dan.net.resnet_widths, dan.net.backbone_size) == (3, [8, 8, 16, 16], 56)
    assert (dan.net.affinity_weight, dan.net.partition_weight) == (1.0, 0.5)
    current = cfg.to_dict()  # the current layout passes unchanged ("auto" None dropped)
    assert upgrade_legacy(current) == {s: {k: v for k, v in vals.items() if v is not None}
                                       for s, vals in current.items()}
    assert config_from_dict(upgrade_legacy(current)) == cfg
    # the flat layout is not accepted silently where a current config is expected
    with pytest.raises(ConfigError, match=r"unknown key model.variant \(it belongs in "
                       r"\[qcs\]: qcs.variant\)"):
        config_from_dict(LEGACY_QCS, "legacy")


@pytest.mark.parametrize("legacy", [LEGACY_QCS, LEGACY_DAN], ids=["qcs", "dan"])
def test_legacy_checkpoint_loads_for_inference(legacy, tmp_path):
    cfg = config_from_dict(upgrade_legacy(legacy), "legacy").validate()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "best", model, {"config": json.loads(json.dumps(legacy)),
                                               "classes": CLASSES, "epoch": 3})
    assert read_metadata(tmp_path / "best")["config"]["model"].get("dan_heads") is not None
    loaded = load_model(tmp_path)
    assert loaded.config.model.family == legacy["model"]["family"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
