"""The eight ``paper-*`` presets against the table of docs/paper-presets.md, which records
what each of the authors' training scripts runs (argument defaults, the transforms that
are not inside string literals, sampler, model-file dropout, cross-module residual)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from qcs.cli import main
from qcs.config import PAPER_PRESETS, load_config
from qcs.convert import published_form

DOC = Path(__file__).resolve().parents[1] / "docs" / "paper-presets.md"
SCRIPT_TO_PRESET = {"QCS RAF-DB": "paper-qcs-rafdb", "QCS FERPlus": "paper-qcs-ferplus",
                    "QCS AffectNet-7": "paper-qcs-affectnet7",
                    "QCS AffectNet-8": "paper-qcs-affectnet8",
                    "DCS RAF-DB": "paper-dcs-rafdb", "DCS FERPlus": "paper-dcs-ferplus",
                    "DCS AffectNet-7": "paper-dcs-affectnet7",
                    "DCS AffectNet-8": "paper-dcs-affectnet8"}
FORMATS = {"RAF-DB": "raf-db", "FERPlus": "ferplus", "AffectNet-7": "affectnet7",
           "AffectNet-8": "affectnet8"}


def _script_table() -> dict[str, dict[str, str]]:
    """The per-script table of the doc: ``{script: {column: cell}}``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| script | lr |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


TABLE = _script_table()


def test_the_table_covers_the_eight_scripts():
    assert sorted(TABLE) == sorted(SCRIPT_TO_PRESET)
    assert sorted(SCRIPT_TO_PRESET.values()) == sorted(PAPER_PRESETS)


def _resize(cell: str) -> int:
    return 0 if "no crop" in cell else int(re.match(r"(\d+) -> 224", cell)[1])


def _anchors(cell: str) -> tuple[bool, int]:
    if cell == "every image once, shuffled":
        return False, 1
    return True, int(re.search(r"N/(\d+) per epoch", cell)[1])


@pytest.mark.parametrize("script", sorted(SCRIPT_TO_PRESET))
def test_preset_holds_the_scripts_values(script):
    row, cfg = TABLE[script], load_config(SCRIPT_TO_PRESET[script])
    variant, dataset = script.split(" ", 1)
    net, d, o, t = cfg.net, cfg.data, cfg.optim, cfg.train
    assert (net.variant, d.format) == (variant.lower(), FORMATS[dataset])
    assert o.lr == float(row["lr"]) and t.batch_size == int(row["batch"])
    assert t.epochs == int(row["epochs"])
    assert d.image_size == 224 and d.resize == _resize(row["train resize -> crop"])
    assert d.rotation == (0.0 if row["rotation"] == "none" else float(row["rotation"][:-4]))
    assert d.color_jitter == (row["colour jitter"] == "yes")
    assert d.erasing == [float(x) for x in row["erasing area"].split("-")]
    assert (d.balanced, d.epoch_divisor) == _anchors(row["anchors"])
    base, cross = (float(x.split()[0]) for x in row["ViT dropout base / cross"].split(" / "))
    assert (net.dropout, net.vit_cross_dropout, net.cross_mlp_dropout) == (base, cross, 0.0)
    if "(+ proj)" in row["ViT dropout base / cross"]:
        assert net.attn_proj_dropout
    elif base or cross:
        assert not net.attn_proj_dropout
    residual = {"normalised": "normed", "input": "input"}[row["cross residual"]]
    classes = 8 if dataset in ("FERPlus", "AffectNet-8") else 7
    assert net.cross_residual == residual == published_form(net.variant, classes)["cross_residual"]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_what_every_script_shares(name):
    cfg = load_config(name)
    net, o = cfg.net, cfg.optim
    assert net.backbone_resize == "nearest" and net.csa_scope == "batch" and net.csa_gamma == 1.0
    assert (net.backbone_depths, net.backbone_widths, net.backbone_size) == (
        [3, 4, 14], [64, 128, 256], 112)
    assert (net.embed_dim, net.tokens_side, net.vit_depth, net.vit_cross_depth, net.heads,
            net.mlp_ratio) == (768, 7, 2, 1, 8, 4.0)
    assert net.csa_mode == "sd" and net.distill == "none"
    assert (o.name, o.weight_decay, o.sam, o.sam_rho, o.sam_adaptive, o.lr_gamma) == (
        "adam", 0.0, True, 0.05, False, 0.98)
    assert cfg.data.val_split == "none" and cfg.train.select_on == "auto"
    assert cfg.data.num_workers == 4 and cfg.train.amp == "none"


def test_paper_qcs_and_paper_dcs_are_the_raf_db_presets():
    assert load_config("paper-qcs").to_dict() == load_config("paper-qcs-rafdb").to_dict()
    assert load_config("paper-dcs").to_dict() == load_config("paper-dcs-rafdb").to_dict()


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_config_show_prints_the_preset(name, capsys):
    assert main(["config", "show", name]) == 0
    out = capsys.readouterr().out
    cfg = load_config(name)
    assert f"lr = {cfg.optim.lr!r}" in out and f"epochs = {cfg.train.epochs}" in out
    assert f'format = "{cfg.data.format}"' in out and f"resize = {cfg.data.resize}" in out


@pytest.mark.parametrize("variant", ["qcs", "dcs", "baseline"])
@pytest.mark.parametrize("data", ["raf-db", "ferplus", "affectnet7", "affectnet8"])
def test_convert_defaults_to_the_scripts_preset(variant, data):
    """``qcs convert`` without ``--config`` takes the preset of the script that trained the
    file (so the converted checkpoint evaluates with that script's test transform)."""
    from qcs.convert import matching_preset
    name = matching_preset(variant, data)
    cfg = load_config(name)
    if variant == "baseline":
        assert name == "paper-baseline"
        return
    assert cfg.net.variant == variant and cfg.data.format == data
