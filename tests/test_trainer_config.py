"""Typed config: presets, overrides, errors, TOML round trip; checkpoint files."""

from __future__ import annotations

import json

import pytest
import torch
from qcs.checkpoint import (
    CheckpointError,
    checkpoint_base,
    load_state,
    load_weights,
    read_metadata,
    save_checkpoint,
)
from qcs.config import PRESETS, ConfigError, apply_overrides, config_from_dict, load_config, to_toml


def test_paper_presets_follow_the_spec():
    qcs, dcs, base = (load_config(f"paper-{v}") for v in ("qcs", "dcs", "baseline"))
    for cfg in (qcs, dcs, base):
        m, o = cfg.net, cfg.optim
        assert (m.backbone_depths, m.backbone_widths, m.backbone_size) == ([3, 4, 14],
                                                                          [64, 128, 256], 112)
        assert (m.embed_dim, m.tokens_side, m.vit_depth, m.vit_cross_depth, m.heads) == (
            768, 7, 2, 1, 8)
        assert (m.mlp_ratio, m.csa_gamma) == (4.0, 1.0)
        # the scripts parse --wd 1e-4 but never hand it to the optimiser: Adam runs with 0
        wd = 1e-4 if cfg is base else 0.0
        assert (o.name, o.sam, o.sam_rho, o.weight_decay, o.lr_gamma) == ("adam", True, 0.05,
                                                                          wd, 0.98)
        assert cfg.data.image_size == 224 and cfg.train.epochs == 200
    assert (qcs.net.variant, qcs.optim.lr, qcs.train.batch_size, qcs.net.csa_mode) == (
        "qcs", 3e-6, 24, "sd")
    assert (dcs.net.variant, dcs.optim.lr, dcs.train.batch_size) == ("dcs", 9e-6, 48)
    assert base.net.variant == "baseline"
    tiny = load_config("tiny")
    assert tiny.data.format == "synth" and tiny.net.tokens_side == 7
    assert set(PRESETS) == {"tiny", "paper-qcs", "paper-dcs", "paper-baseline"} | {
        f"paper-{v}-{d}" for v in ("qcs", "dcs")
        for d in ("rafdb", "ferplus", "affectnet7", "affectnet8")}


def test_overrides_and_errors(tmp_path):
    cfg = apply_overrides(load_config("tiny"), ["qcs.dropout=0.3", "optim.lr=1e-4",
                                                "qcs.backbone_widths=[8, 16, 32]",
                                                "data.root=some/dir", "data.balanced=true"])
    assert cfg.net.dropout == 0.3 and cfg.optim.lr == 1e-4
    assert cfg.net.backbone_widths == [8, 16, 32] and cfg.data.root == "some/dir"
    assert cfg.data.balanced is True
    with pytest.raises(ConfigError, match="unknown key qcs.dropuot"):
        apply_overrides(cfg, ["qcs.dropuot=0.1"])
    with pytest.raises(ConfigError, match="optim.lr must be float"):
        apply_overrides(cfg, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="qcs.variant must be one of"):
        apply_overrides(cfg, ["qcs.variant=tcs"])
    with pytest.raises(ConfigError, match="backbone_size"):
        apply_overrides(cfg, ["qcs.backbone_size=64"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: train.epochs must be int"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip_and_user_file(tmp_path):
    cfg = apply_overrides(load_config("paper-dcs"), ["train.seed=7", "data.root=/x/y"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    user = tmp_path / "u.toml"
    user.write_text('preset = "paper-qcs"\n[train]\nepochs = 40\n[data]\nformat = "affectnet8"\n')
    got = load_config(user)
    assert got.train.epochs == 40 and got.optim.lr == 3e-6 and got.data.format == "affectnet8"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "last", model, {"epoch": 3, "classes": ["a", "b"]},
                    {"optimizer": opt.state_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors",
                                                          "last.state.pt"]  # no temp files left
    meta = read_metadata(tmp_path / "last.safetensors")
    assert meta["epoch"] == 3 and meta["classes"] == ["a", "b"]
    weights = load_weights(tmp_path, expect_epoch=3)  # a run dir means its "last"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k], v)
    opt2 = torch.optim.Adam(model.parameters(), lr=0.1)
    opt2.load_state_dict(load_state(tmp_path / "last")["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"],
                               opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="holds epoch '3' but its JSON says 4"):
        load_weights(tmp_path / "last", expect_epoch=4)
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a qcs checkpoint"):
        read_metadata(tmp_path / "x")
    assert checkpoint_base(tmp_path / "best.state.pt") == tmp_path / "best"


class _Evil:  # any non-tensor object must be refused when the state is read back
    pass


def test_state_file_refuses_pickled_objects(tmp_path):
    torch.save({"optimizer": _Evil()}, tmp_path / "last.state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state(tmp_path / "last")
