"""The Python API: every example of ``docs/python-api.md`` runs, in order, as one script in
an empty directory, and what it leaves behind is checked; the lazy re-exports of ``qcs``."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_import_qcs_is_light():
    code = ("import sys, qcs; heavy = [m for m in ('torch', 'numpy', 'qcs_ext') if m in "
            "sys.modules]; print(heavy); assert not heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_reexports_resolve():
    import qcs
    from qcs import api, config, errors, training
    assert qcs.load_config is api.load_config and qcs.train is training.train
    assert qcs.load_model is api.load_model and qcs.predict_images is api.predict_images
    assert qcs.export_onnx is api.export_onnx and qcs.Config is config.Config
    assert qcs.QCSError is errors.QCSError and qcs.Callback is training.Callback
    assert set(qcs.__all__) == {*qcs._EXPORTS, "__version__"} and set(qcs.__all__) <= set(dir(qcs))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qcs.nope  # noqa: B018


@pytest.mark.slow
def test_documented_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QCS_CACHE", str(tmp_path / "cache"))
    blocks = _examples()
    assert len(blocks) >= 7
    namespace: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name}[{i}]", "exec"), namespace)  # noqa: S102
    text = out.getvalue()
    ns = namespace
    assert (tmp_path / "runs/demo/best.safetensors").is_file()
    assert (tmp_path / "runs/demo/metrics.csv").is_file()
    assert len(ns["history"].losses) == 4                 # 1 epoch x max 4 steps
    assert ns["report"].ok and ns["onnx_model"].classes == ns["model"].classes
    assert "best test accuracy" in text and "error: " in text and "epochz" in text
    records = list(ns["qcs"].predict_images(ns["model"], ns["crops"], detect=False))
    assert [r["status"] for r in records] == ["ok"] * len(ns["crops"])
