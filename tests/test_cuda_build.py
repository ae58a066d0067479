"""Build-level checks of the CUDA kernels that need no GPU.

- the compile gate: every csrc/cuda/*.cu compiled by nvcc for sm_80 and sm_90 with
  ``ptxas -v``; fails on register spills or local memory and prints the resource table;
- the emulated kernels under ThreadSanitizer and under AddressSanitizer + UBSan: the
  torch-free driver tests/cpp/csa_emulated_driver.cpp (the same build as the
  CMake targets emulated_driver_tsan / emulated_driver_asan) must run clean.

Skipped when nvcc (gate) or a C++ compiler (sanitizers) is missing, except in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
DRIVER = ROOT / "tests" / "cpp" / "csa_emulated_driver.cpp"
INCLUDES = [f"-I{ROOT / d}" for d in ("csrc", "csrc/emulation", "csrc/cuda")]


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _have_nvcc() -> bool:
    from qcs_tools import cuda_compile_gate
    return cuda_compile_gate.find_nvcc() is not None


def _skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.slow
def test_cuda_compile_gate():
    if not _have_nvcc():
        _skip_or_fail("nvcc not found (set CUDA_HOME)")
    proc = subprocess.run(
        [sys.executable, "-m", "qcs_tools.cuda_compile_gate", "--arch", "80", "--arch", "90"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    print(proc.stdout)  # the registers / shared memory table (pytest -s shows it)
    print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, f"compile gate failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout


# kind: (compiler flags, environment, driver arguments); TSan runs the quick subset.
SANITIZERS = {
    "plain": (["-O2"], {}, []),
    "tsan": (
        ["-O1", "-g", "-fsanitize=thread"],
        {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1"},
        ["quick"],
    ),
    "asan_ubsan": (
        ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
        [],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SANITIZERS))
def test_emulated_kernels_sanitizers(kind, tmp_path):
    cxx = _cxx()
    if cxx is None:
        _skip_or_fail("no C++ compiler")
    flags, env_extra, args = SANITIZERS[kind]
    exe = tmp_path / f"driver_{kind}"
    build = subprocess.run(
        [cxx, "-std=c++20", "-Wall", "-Wextra", *flags, *INCLUDES, str(DRIVER), "-o", str(exe), "-pthread"],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    env = {**os.environ, **env_extra}
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=900)
    out = run.stdout + run.stderr
    print(out[-6000:])
    for marker in ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"):
        assert marker not in out, f"{kind}: sanitizer report\n{out[-6000:]}"
    assert run.returncode == 0, f"{kind}: driver exited with {run.returncode}\n{out[-6000:]}"
    assert "all checks passed" in run.stdout


@pytest.mark.slow
def test_tsan_detects_a_missing_syncthreads(tmp_path):
    """Negative control: with the barrier after the fused epilogue's shared-memory load
    removed, ThreadSanitizer must report the race (so a clean run above means something)."""
    cxx = _cxx()
    if cxx is None:
        _skip_or_fail("no C++ compiler")
    src = (ROOT / "csrc" / "cuda" / "csa_kernels.cuh").read_text()
    load = "mat[e] = sim ? ext - d[e] : d[e] - ext;\n    __syncthreads();"
    assert load in src, "the fused epilogue changed: update this negative control"
    (tmp_path / "csa_kernels.cuh").write_text(src.replace(load, "mat[e] = sim ? ext - d[e] : d[e] - ext;", 1))
    exe = tmp_path / "driver_racy"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", f"-I{tmp_path}", *INCLUDES, str(DRIVER), "-o", str(exe),
         "-pthread"],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=900)
    assert "WARNING: ThreadSanitizer: data race" in run.stderr, run.stderr[-3000:]
    assert run.returncode == 66
