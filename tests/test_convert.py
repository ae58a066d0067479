"""``qcs convert``: the official QCS checkpoint format read without running code from it,
its weights renamed onto our network; and every other ``.pth`` we read is
``weights_only=True`` (a hostile file is refused and does not execute)."""

from __future__ import annotations

import builtins
import os
import re
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import QCS_MICRO_SET
from qcs.checkpoint import CheckpointError, load_state, load_weights, read_metadata
from qcs.cli import main
from qcs.config import apply_overrides, load_config
from qcs.convert import ConvertError, InertStandIn, convert_official, load_untrusted, official_key
from qcs.families import build_model
from qcs.models.ir50 import IR50, load_backbone_weights


def _micro_cfg(variant: str = "qcs"):
    cfg = apply_overrides(load_config("tiny"), QCS_MICRO_SET + [f"qcs.variant={variant}"])
    cfg.model.num_classes = 7
    return cfg


def _official_name(key: str, stage_starts: list[int], old_names: bool) -> str:
    """Our key -> the official repository's name, written out independently of
    qcs.convert (models/QCS_7cls_raf_db.py, POSTER++'s ir50.py and vit_model.py)."""
    if m := re.match(r"ir_back\.body\.(\d+)\.(.*)", key):
        j = int(m[1])
        stage = max(s for s in range(3) if stage_starts[s] <= j)
        return f"ir_back.body{stage + 1}.{j - stage_starts[stage]}.{m[2]}"
    if m := re.match(r"embeds\.(\d)\.down\.(.*)", key):
        return f"conv{int(m[1]) + 1}.{m[2]}"
    embed = ("embed_q", "embed_k", "embed_v") if old_names else ("embed_1", "embed_2", "embed_3")
    if m := re.match(r"embeds\.(\d)\.embed\.(\d)\.(.*)", key):
        level = int(m[1])
        return (f"{embed[level]}.proj.{m[3]}" if level == 2
                else f"{embed[level]}.{m[2]}.{m[3]}")
    if m := re.match(r"cross\.(\d)\.(.*)", key):
        inner = m[2].replace("qkv.", "proj.").replace("mlp.0.", "mlp.fc1.").replace(
            "mlp.3.", "mlp.fc2.")
        return f"cross_attention_{int(m[1]) + 1}.{inner}"
    if m := re.match(r"vit_(base|cross)\.(.*)", key):
        inner = (m[2].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                 .replace("se.0.", "se_block.linear1.").replace("se.2.", "se_block.linear2.")
                 .replace("head.", "head.linear."))
        return f"VIT_{m[1]}.{inner}"
    return key


class RecorderMeter_loss:  # noqa: N801 -- the authors' class name, pickled from __main__
    """Like the authors' recorder: numpy arrays in a plain object."""

    def __init__(self, epochs: int) -> None:
        rng = np.random.default_rng(0)
        self.total_epoch, self.current_epoch = epochs, 3
        self.epoch_losses = rng.random((epochs, 4), dtype=np.float32)


class _RunsCode:
    """An entry whose unpickling would run ``func(arg)``."""

    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _official_file(tmp_path, monkeypatch, *, variant="qcs", old_names=True, extra=None,
                   drop=(), legacy=False, name="official.pth", recorder=None):
    """Write a checkpoint in the official format; return (path, our original weights)."""
    torch.manual_seed(0)
    cfg = _micro_cfg(variant)
    model = build_model(cfg)
    with torch.no_grad():  # distinct values everywhere (BN statistics and theta included)
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if k.endswith("running_var")
                        else torch.randn_like(t))
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    starts = [0, *model.ir_back.stage_ends[:-1]]
    state = OrderedDict((f"module.{_official_name(k, starts, old_names)}", v)
                        for k, v in ours.items())
    for key in drop:
        del state[key]
    # tensors the official network holds but never uses
    state["module.ir_back.output_layer.3.weight"] = torch.randn(4, 6)
    state["module.VIT_base.patch_embed.proj.weight"] = torch.randn(5, 3, 1, 1)
    state["module.VIT_base.blocks.0.conv.weight"] = torch.randn(3, 3, 1)
    state["module.VIT_cross.IRLinear1.weight"] = torch.randn(2, 2)
    state.update(extra or {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.vit_base.head.weight.sum().backward()
    opt.step()
    # the authors' recorder classes live in their script's __main__
    monkeypatch.setattr(sys.modules["__main__"], "RecorderMeter_loss", RecorderMeter_loss,
                        raising=False)
    monkeypatch.setattr(RecorderMeter_loss, "__module__", "__main__")
    payload = {"epoch": 37, "state_dict": state, "best_acc": torch.tensor(92.5),
               "optimizer": opt.state_dict(),
               "recorder": RecorderMeter_loss(5) if recorder is None else recorder,
               "recorder_m": RecorderMeter_loss(2)}
    path = tmp_path / name
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path, ours, cfg


@pytest.mark.parametrize("old_names, legacy", [(True, False), (False, False), (True, True)])
def test_convert_official_checkpoint(tmp_path, monkeypatch, old_names, legacy, capsys,
                                     qcs_micro_root):
    src, ours, cfg = _official_file(tmp_path, monkeypatch, old_names=old_names, legacy=legacy)
    sets = [a for s in QCS_MICRO_SET for a in ("--set", s)]
    assert main(["convert", str(src), str(tmp_path / "conv"), "--config", "tiny", *sets]) == 0
    out = capsys.readouterr().out
    assert (f"qcs network, 7 classes (backbone resize nearest, cross residual normed), "
            f"epoch 37: {len(ours)} tensors loaded, 4 unused") in out
    assert "__main__.RecorderMeter_loss" in out  # read as an inert stand-in
    weights = load_weights(tmp_path / "conv", expect_epoch=37)
    assert weights.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(weights[k], v), k
    meta = read_metadata(tmp_path / "conv")
    assert meta["classes"][0] == "surprise" and meta["best_acc"] == pytest.approx(0.925)
    model = build_model(_micro_cfg("qcs"))
    model.load_state_dict(weights)  # strict: every tensor of our network is there
    assert torch.isfinite(model.eval()(torch.rand(2, 3, 32, 32))).all()
    if legacy:
        return
    # the converted checkpoint evaluates like one of ours
    assert main(["eval", "--checkpoint", str(tmp_path / "conv"), "--data", "raf-db",
                 "--data-root", str(qcs_micro_root), "--quiet", "--out", str(tmp_path)]) == 0
    assert "(epoch 37), 140 test images" in capsys.readouterr().out


def test_convert_detects_dcs_and_baseline(tmp_path, monkeypatch):
    for variant in ("dcs", "baseline"):
        src, ours, cfg = _official_file(tmp_path, monkeypatch, variant=variant,
                                        old_names=False, name=f"{variant}.pth")
        report = convert_official(src, tmp_path / variant, config=_micro_cfg())
        assert report.variant == variant and report.loaded == len(ours)
        weights = load_weights(tmp_path / variant)
        assert all(torch.equal(weights[k], v) for k, v in ours.items())
        assert read_metadata(tmp_path / variant)["config"]["qcs"]["variant"] == variant


def test_missing_unexpected_and_mismatched_keys(tmp_path, monkeypatch):
    src, ours, cfg = _official_file(
        tmp_path, monkeypatch, drop=["module.VIT_base.norm.weight"],
        extra={"module.extra_head.weight": torch.zeros(2)})
    with pytest.raises(ConvertError, match=r"(?s)--no-strict.*1 missing, 1 unexpected.*"
                       r"missing.*vit_base\.norm\.weight.*unexpected.*extra_head\.weight"):
        convert_official(src, tmp_path / "c", config=_micro_cfg())
    assert not (tmp_path / "c.safetensors").exists()
    report = convert_official(src, tmp_path / "c", config=_micro_cfg(), strict=False)
    assert report.missing == ["vit_base.norm.weight"] and report.unexpected == ["extra_head.weight"]
    weights = load_weights(tmp_path / "c")
    assert torch.equal(weights["vit_base.head.weight"], ours["vit_base.head.weight"])
    assert not torch.equal(weights["vit_base.norm.weight"], ours["vit_base.norm.weight"])
    # a wider network than the file's: shapes differ, refused even with --no-strict
    wide = _micro_cfg()
    wide.net.embed_dim = 32
    with pytest.raises(ConvertError, match=r"shape-mismatched: .*vs ours"):
        convert_official(src, tmp_path / "w", config=wide, strict=False)
    with pytest.raises(ConvertError, match="has 7 classes but ferplus has 8"):
        convert_official(src, tmp_path / "f", config=_micro_cfg(), data_format="ferplus")


def test_official_names_at_paper_geometry():
    cfg = load_config("paper-qcs")
    cfg.model.num_classes = 7
    with torch.device("meta"):  # shapes only, no memory
        own = build_model(cfg).state_dict()
    starts = (0, 3, 7)
    shapes = {  # official name (QCS_7cls_raf_db.py, POSTER++ ir50 / vit_model) -> shape
        "embed_q.1.weight": (768, 768, 3, 3), "embed_2.0.weight": (768, 128, 3, 3),
        "embed_v.proj.weight": (768, 256, 1, 1), "conv3.weight": (256, 256, 3, 3),
        "ir_back.body3.13.res_layer.4.running_var": (256,),
        "ir_back.body2.0.shortcut_layer.0.weight": (128, 64, 1, 1),
        "ir_back.input_layer.2.weight": (64,),
        "VIT_base.blocks.1.attn.proj.bias": (768,), "VIT_base.blocks.0.mlp.fc1.weight": (3072, 768),
        "VIT_base.se_block.linear2.weight": (768, 768), "VIT_base.head.linear.weight": (7, 768),
        "VIT_base.pos_embed": (1, 148, 768), "VIT_cross.blocks.0.attn.qkv.weight": (2304, 768),
        "cross_attention_3.proj.weight": (1536, 768), "cross_attention_1.theta": (),
        "cross_attention_2.mlp.fc2.weight": (768, 3072), "cross_attention_1.norm2.bias": (768,),
    }
    for name, shape in shapes.items():
        ours = official_key(name, starts)
        assert ours in own and tuple(own[ours].shape) == shape, (name, ours)
    assert official_key("ir_back.body3.13.res_layer.0.weight", starts) == \
        "ir_back.body.20.res_layer.0.weight"
    assert official_key("ir_back.output_layer.1.weight", starts) is None
    assert official_key("VIT_cross.eca_block.conv.weight", starts) is None


def test_code_in_the_pickle_never_runs(tmp_path, monkeypatch, capsys, qcs_micro_root):
    marker = tmp_path / "pwned"
    # 1. os.system: refused before anything is built
    src, ours, _ = _official_file(tmp_path, monkeypatch, name="os.pth",
                                  recorder=_RunsCode(os.system, f"touch {marker}"))
    with pytest.raises(ConvertError, match=r"refusing .*os.pth: its pickle names "
                       r"(os|posix)\.system"):
        load_untrusted(src)
    assert main(["convert", str(src), str(tmp_path / "x")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists()
    # 2. builtins.exec: replaced by an inert stand-in, the weights still convert
    src, ours, _ = _official_file(
        tmp_path, monkeypatch, name="exec.pth",
        recorder=_RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').write('x')"))
    obj, stand_ins = load_untrusted(src)
    assert not marker.exists()
    assert "builtins.exec" in stand_ins and "__main__.RecorderMeter_loss" in stand_ins
    assert isinstance(obj["recorder"], InertStandIn) and isinstance(obj["recorder_m"],
                                                                    InertStandIn)
    assert torch.equal(obj["state_dict"]["module.VIT_base.head.linear.weight"],
                       ours["vit_base.head.weight"])
    report = convert_official(src, tmp_path / "y", config=_micro_cfg())
    assert report.loaded == len(ours) and "builtins.exec" in report.stand_ins
    assert not marker.exists()
    # 3. the same files given where we expect plain weights: refused by weights_only=True
    ir = IR50((1, 1, 1), (8, 8, 16), 32)
    with pytest.raises(RuntimeError, match=r"weights_only=True"):
        load_backbone_weights(ir, src)
    sets = [a for s in QCS_MICRO_SET for a in ("--set", s)]
    code = main(["train", "--pretrained", str(src), "--data", "raf-db", "--data-root",
                 str(qcs_micro_root), "--epochs", "1", "--quiet", "--out", str(tmp_path / "run"),
                 *sets])
    assert code == 2 and not marker.exists()
    assert "weights_only=True" in capsys.readouterr().err
    state_file = tmp_path / "ck.state.pt"
    state_file.write_bytes(src.read_bytes())
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_state(tmp_path / "ck")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ConvertError, match=r"junk.pth"):
        load_untrusted(junk)
    with pytest.raises(ConvertError, match="not found"):
        load_untrusted(tmp_path / "none.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "plain.pth")
    with pytest.raises(ConvertError, match=r"no state dict of tensors \(top level: weights\)"):
        convert_official(tmp_path / "plain.pth", tmp_path / "o")
    with pytest.raises(CheckpointError):
        read_metadata(tmp_path / "o")
