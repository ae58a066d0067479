"""qcs export: the ONNX round trip (onnxruntime logits match PyTorch to 1e-4 at several
batch sizes: the batch axis is dynamic), no CSA op in the graph, torch.export program."""

from __future__ import annotations

import sys

import pytest
import torch
from qcs.cli import main
from qcs.export import export_onnx, export_program, verify_onnx
from qcs.inference import load_model
from use_helpers import make_checkpoint

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export_ckpt"), variant="qcs", seed=3)


def test_onnx_round_trip_dynamic_batch_and_no_csa_op(ckpt, tmp_path):
    import onnx
    loaded = load_model(ckpt)
    path = export_onnx(loaded, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value          # symbolic batch axis
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}        # standard ops only
    assert not any("csa" in n.op_type.lower() for n in graph.node)
    report = verify_onnx(loaded, path, batch_sizes=(1, 3, 8))
    assert report.max_abs_diff < 1e-4, report
    # independent of verify_onnx: run it here on an input it never saw
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    (got,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = loaded.model(x)
    assert want.abs().max() > 1e-3                                  # not a trivial zero map
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_torch_export_program_matches(ckpt, tmp_path):
    loaded = load_model(ckpt)
    path = export_program(loaded, tmp_path / "m.pt2")
    program = torch.export.load(str(path)).module()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(program(x), loaded.model(x), atol=1e-5, rtol=0)


def test_export_cli_reports_difference_and_errors(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "largest logit difference" in text and "(OK;" in text
    assert "[batch, 7]" in text
    assert main(["export", "--checkpoint", str(ckpt)]) == 2           # nothing to write
    assert "--onnx" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "x.bin")]) == 2
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--onnx",
                 str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err

    def broken(*args, **kwargs):  # an exporter failure, wrapped as the exporter does
        try:
            raise KeyError("no ONNX function for aten.some_op")
        except KeyError as exc:
            raise RuntimeError("Failed to convert the exported program") from exc
    monkeypatch.setattr(torch.onnx, "export", broken)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "b.onnx")]) == 1
    err = capsys.readouterr().err
    assert "ONNX conversion of the QCSNet network failed: KeyError" in err
    assert "--torch-export" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 2
    assert "pip install onnx onnxscript onnxruntime" in capsys.readouterr().err
