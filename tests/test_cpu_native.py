"""Builds and runs the native C++ tests of the CPU inner kernels (tests/cpp), plainly and
under AddressSanitizer + UndefinedBehaviorSanitizer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ([ROOT / "tests/cpp/test_cpu_kernels.cpp"]
           + sorted((ROOT / "csrc/cpu").glob("kernels_*.cpp")))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _build_and_run(tmp_path: Path, extra_flags: list[str]) -> str:
    binary = tmp_path / "test_cpu_kernels"
    cmd = ["g++", "-std=c++20", "-O2", "-ffp-contract=fast", "-fno-math-errno",
           "-fno-trapping-math", f"-I{ROOT / 'csrc'}", *extra_flags,
           *map(str, SOURCES), "-o", str(binary)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failed" in run.stdout and "passed" in run.stdout
    return run.stdout + run.stderr


def test_cpu_kernels_native(tmp_path):
    _build_and_run(tmp_path, [])


@pytest.mark.slow
def test_cpu_kernels_under_asan_ubsan(tmp_path):
    out = _build_and_run(
        tmp_path, ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1"]
    )
    assert "runtime error" not in out and "AddressSanitizer" not in out
