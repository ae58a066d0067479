"""The exported ONNX file stands alone: its metadata carries the class names, input size and
normalisation, and ``qcs predict`` runs from the ``.onnx`` file through onnxruntime, with
the same probabilities as from the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qcs.cli import main
from qcs.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from qcs.export import export_onnx
from qcs.inference import load_model
from use_helpers import CLASSES, make_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_predict")
    ckpt = make_checkpoint(tmp / "ckpt", variant="qcs", seed=5)
    path = export_onnx(load_model(ckpt), tmp / "model.onnx")
    return ckpt, path


@pytest.fixture
def crops(tmp_path):
    gen = np.random.default_rng(1)
    root = tmp_path / "crops"
    root.mkdir()
    for i in range(4):
        Image.fromarray(gen.integers(0, 255, (36 + 3 * i, 40, 3), dtype=np.uint8)).save(
            root / f"c{i}.png")
    return root


def test_metadata_holds_classes_size_and_normalisation(exported):
    ckpt, path = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    loaded = load_model(ckpt)
    assert json.loads(props["qcs.classes"]) == CLASSES == loaded.classes
    assert int(props["qcs.image_size"]) == loaded.image_size == 32
    assert int(props["qcs.channels"]) == 3
    assert json.loads(props["qcs.mean"]) == list(IMAGENET_MEAN)
    assert json.loads(props["qcs.std"]) == list(IMAGENET_STD)
    assert props["qcs.network"] == "qcs/qcs"


def test_predict_from_onnx_matches_predict_from_checkpoint(exported, crops, tmp_path):
    ckpt, path = exported
    by_onnx, by_ckpt = tmp_path / "onnx.jsonl", tmp_path / "ckpt.jsonl"
    assert main(["predict", "--checkpoint", str(path), "--no-detect", str(crops),
                 "-o", str(by_onnx)]) == 0
    assert main(["predict", "--checkpoint", str(ckpt), "--no-detect", str(crops),
                 "-o", str(by_ckpt)]) == 0
    got = [json.loads(line) for line in by_onnx.read_text().splitlines()]
    want = [json.loads(line) for line in by_ckpt.read_text().splitlines()]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert a["file"] == b["file"] and a["status"] == b["status"] == "ok"
        assert a["label"] == b["label"]
        for c in CLASSES:
            assert a["probabilities"][c] == pytest.approx(b["probabilities"][c], abs=1e-4)
    spread = max(max(r["probabilities"].values()) - min(r["probabilities"].values()) for r in want)
    assert spread > 1e-3  # the comparison is not between two uniform outputs


def test_onnx_without_metadata_is_refused(exported, crops, tmp_path, capsys):
    _, path = exported
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    assert main(["predict", "--checkpoint", str(bare), "--no-detect", str(crops)]) == 2
    err = capsys.readouterr().err
    assert "bare.onnx" in err and "qcs.classes" in err
    assert main(["predict", "--checkpoint", str(tmp_path / "none.onnx"), "--no-detect",
                 str(crops)]) == 2
    assert "none.onnx" in capsys.readouterr().err
