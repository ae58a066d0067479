"""The wheel smoke test: what a user gets from ``pip install`` of a built wheel.

Builds a wheel from a copy of this checkout's sources (``--no-build-isolation``, CPU
kernels only: it compiles the extension once, a few minutes), installs it into a fresh
virtual environment that sees the already installed torch through a ``.pth`` line (and
nothing of this checkout), then runs ``qcs --version``, a fused op against the reference,
and a one-epoch ``qcs train`` on a small built-in dataset there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch

import qcs

from conftest import QCS_MICRO_SET

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                "*.so", "_build_info.py", "runs", ".pytest_cache", ".hypothesis",
                                ".benchmarks", ".cache", "shared")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would let this checkout shadow the wheel."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (as a clone has them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
          "-w", str(tmp / "dist"), str(src)], tmp, timeout=1800,
         QCS_BUILD_CUDA="0", QCS_BUILD_EMULATION="0")
    (built,) = (tmp / "dist").glob("qcs_ext-*.whl")
    return built


@pytest.fixture(scope="module")
def env_with_wheel(wheel, tmp_path_factory) -> Path:
    """A fresh venv that sees the installed torch (and the other dependencies) through a
    ``.pth`` line, with the wheel installed into it; returns its ``bin`` directory."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    bindir = root / "bin"
    site = Path(_run([str(bindir / "python"), "-c", "import sysconfig; "
                      "print(sysconfig.get_paths()['purelib'])"], root, 60).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
            str(Path(torch.__file__).parents[1])}
    (site / "pinned-torch.pth").write_text("\n".join(sorted(deps)) + "\n")
    # with its dependencies: they must all be satisfied by what the .pth line shows
    _run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "-q",
          "--no-index", str(wheel)], root, timeout=300)
    return bindir


@pytest.mark.slow
def test_wheel_contents(wheel):
    assert wheel.name.endswith("-cp310-abi3-linux_x86_64.whl") or "abi3" in wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
        info = zf.read("qcs_ext/_build_info.py").decode()
    for needed in ("qcs_ext/py.typed", "qcs/py.typed", "qcs_ext/_C.so", "qcs/configs/tiny.toml"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "License-Expression: MIT" in meta and "Requires-Python: >=3.10" in meta
    assert 'Requires-Dist: tomli>=1.1; python_version < "3.11"' in meta
    assert f"TORCH_VERSION = {torch.__version__!r}" in info and "WITH_CUDA = False" in info


@pytest.mark.slow
def test_installed_wheel_runs(env_with_wheel, tmp_path):
    bindir = env_with_wheel
    out = _run([str(bindir / "qcs"), "--version"], tmp_path, 120)
    assert out.stdout.startswith(f"qcs {qcs.__version__}") and torch.__version__ in out.stdout

    op_check = textwrap.dedent("""
        import sys, torch, qcs_ext, qcs
        from qcs_ext import _build_info, reference
        for mod in (qcs_ext, qcs):
            assert mod.__file__.startswith(sys.prefix), mod.__file__  # the wheel's, not ours
        assert _build_info.TORCH_VERSION == torch.__version__
        assert qcs_ext.has_fused_kernel("cpu")
        torch.manual_seed(0)
        qk = torch.randn(4, 3, 7, 16, dtype=torch.float64)
        theta = torch.tensor(0.4, dtype=torch.float64)
        got = qcs_ext.cross_similarity_maps(qk, theta)
        want = reference.cross_similarity_maps(qk, theta)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got - want).abs().max()
        print("op ok")
    """)
    assert _run([str(bindir / "python"), "-c", op_check], tmp_path, 120).stdout.strip() == "op ok"

    args = [str(bindir / "qcs"), "train", "--epochs", "1", "--out", str(tmp_path / "run"),
            "--set", "data.synth_train_per_class=16", "--set", "data.synth_test_per_class=4"]
    for item in QCS_MICRO_SET:
        args += ["--set", item]
    out = _run(args, tmp_path, 600, QCS_CACHE=str(tmp_path / "cache"))
    assert "test accuracy:" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
