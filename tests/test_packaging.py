"""Packaging that tells the truth: licence and citation files, the Python versions we claim
(3.10 through the tomli fallback), and the guard that keeps a mismatched torch from taking
``import qcs_ext`` down (simulated: a recorded build torch that differs from the loaded one,
and an extension whose import fails the way an ABI break does)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qcs.config import PRESETS, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from qcs_ext._native import BuildInfo, mismatch

from conftest import QCS_MICRO_SET

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# A prologue that makes qcs_ext believe it was built against torch 1.0.0 (as if the user
# upgraded torch after building), before anything imports it.
FAKE_OLD_BUILD = """
import sys, types
info = types.ModuleType("qcs_ext._build_info")
info.TORCH_VERSION, info.TORCH_CUDA, info.WITH_CUDA = "1.0.0", None, False
sys.modules["qcs_ext._build_info"] = info
"""

# A prologue that makes importing qcs_ext._C fail as an ABI break does.
BROKEN_EXTENSION = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "qcs_ext._C":
            raise ImportError(
                "/x/qcs_ext/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
        return None
sys.meta_path.insert(0, Broken())
"""


def test_license_and_citation_files():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the qcs-ext authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    cff = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "preferred-citation:" in cff
    assert (
        "QCS: Feature Refining from Quadruplet Cross Similarity for Facial Expression Recognition"
    ) in cff
    for family, given in [
        ("Wang", "Chengpeng"),
        ("Chen", "Li"),
        ("Wang", "Lili"),
        ("Li", "Zhaofan"),
        ("Lv", "Xuebin"),
    ]:
        assert f"- family-names: {family}\n      given-names: {given}" in cff
    assert "year: 2025" in cff and "AAAI" in cff


def test_pyproject_claims():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = meta["build-system"]["requires"]
    assert "setuptools>=77" in requires  # PEP 639 license expressions
    project = meta["project"]
    assert project["requires-python"] == ">=3.10"
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "tomli>=1.1; python_version < '3.11'" in project["dependencies"]
    assert (ROOT / "qcs_ext" / "py.typed").is_file() and (ROOT / "python/qcs/py.typed").is_file()


def _package_sources() -> list[Path]:
    return sorted([*(ROOT / "python" / "qcs").rglob("*.py"), *(ROOT / "qcs_ext").rglob("*.py")])


@pytest.mark.parametrize("path", _package_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sources_are_python_310(path):
    """The grammar of 3.10 (no ``except*``, no PEP 695 generics) and no stdlib module that
    3.10 lacks, outside the guarded import of tomllib in qcs.config."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 10))
    for node in ast.walk(tree):
        assert not isinstance(node, getattr(ast, "TryStar", ())), f"{path}: except* is 3.11+"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name == "tomllib" and path.name == "config.py":
                    continue
                assert name not in ("tomllib", "wsgiref.types"), f"{path}: imports {name} (3.11+)"


def test_config_loads_through_tomli_when_tomllib_is_missing():
    """Python 3.10 has no tomllib: force that path here and compare every preset."""
    pytest.importorskip("tomli")
    out = _run_python("""
        import json, sys
        sys.modules["tomllib"] = None  # import tomllib now raises ModuleNotFoundError
        from qcs import config
        assert config.tomllib.__name__ == "tomli", config.tomllib
        print(json.dumps({name: config.load_config(name).to_dict() for name in config.PRESETS}))
    """)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == json.loads(json.dumps({n: load_config(n).to_dict() for n in PRESETS}))


def test_mismatch_rules():
    cpu = BuildInfo(torch="2.6.0+cu124", cuda="12.4", with_cuda=False)
    cuda = BuildInfo(torch="2.6.0+cu124", cuda="12.4", with_cuda=True)
    assert mismatch(cpu, "2.6.0+cu124", "12.4") is None
    assert mismatch(cpu, "2.6.0+cpu", None) is None  # CPU kernels: any 2.6.0 wheel
    assert mismatch(cuda, "2.6.0+cu126", "12.6") is None  # same CUDA major
    for version, cuda_version in [("2.7.0+cu124", "12.4"), ("2.6.1", "12.4")]:
        msg = mismatch(cpu, version, cuda_version)
        assert msg is not None and f"torch {version}" in msg and "torch 2.6.0+cu124" in msg
    assert "a CPU build" in mismatch(cuda, "2.6.0+cpu", None)
    assert mismatch(cuda, "2.6.0+cu130", "13.0") is not None
    msg = mismatch(cpu, "2.7.0", "12.4")
    assert msg.count(". ") == 0 and "pip install --no-build-isolation" in msg  # one sentence


_OPS_UNDER_PROLOGUE = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import qcs_ext
    from qcs_ext._native import NativeKernelWarning
import torch
from qcs_ext import nn, reference
mine = [str(w.message) for w in caught if issubclass(w.category, NativeKernelWarning)]
assert len(mine) == 1, [str(w.message) for w in caught]
print(mine[0])
assert not qcs_ext.has_fused_kernel("cpu")
torch.manual_seed(0)
qk = torch.randn(4, 2, 5, 8, dtype=torch.float64)
theta = torch.tensor(0.3, dtype=torch.float64)
try:
    qcs_ext.cross_similarity_maps(qk, theta)
    raise SystemExit("the fused op ran")
except RuntimeError as exc:
    assert str(exc) == mine[0], exc
maps = reference.cross_similarity_maps(qk, theta)
assert torch.allclose(maps.sum(-1), torch.ones(4, 2, dtype=torch.float64))
m = nn.CrossSimilarity(8).double()  # backend auto: falls back to the reference op
x = torch.randn(4, 2, 5, 8, dtype=torch.float64, requires_grad=True)
m(x).sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
"""


def test_import_with_a_mismatched_build_warns_and_keeps_the_reference_ops():
    out = _run_python(FAKE_OLD_BUILD + _OPS_UNDER_PROLOGUE)
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert "built against torch 1.0.0 (CPU kernels only)" in msg
    assert f"torch {torch.__version__}" in msg and "is loaded" in msg
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in msg


def test_import_with_a_broken_extension_warns_and_keeps_the_reference_ops():
    out = _run_python(BROKEN_EXTENSION + _OPS_UNDER_PROLOGUE)
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert "do not load" in msg and "undefined symbol" in msg and "rebuild qcs-ext" in msg
    assert f"torch {torch.__version__} is loaded" in msg


def test_trainer_runs_with_a_mismatched_build(tmp_path):
    """The whole ``qcs train`` path (one short epoch of the micro network) under the
    simulated mismatch: exit 0, the warning once, a checkpoint written."""
    args = [
        "train",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--set",
        "data.synth_train_per_class=8",
        "--set",
        "data.synth_test_per_class=2",
    ]
    for item in QCS_MICRO_SET:
        args += ["--set", item]
    run_cli = "from qcs.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    out = _run_python(FAKE_OLD_BUILD + run_cli, *args)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("built against torch 1.0.0") == 1, out.stderr
    assert (tmp_path / "run" / "best.safetensors").is_file()
