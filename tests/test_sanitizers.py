"""The op tests against sanitizer builds of the extensions (qcs_tools/sanitize.py).

``qcs_ext._C`` (ops, CPU driver with its at::parallel_for threads, inner kernels) and
``qcs_ext._emulated`` (the CUDA kernels under the host emulation) are compiled with
AddressSanitizer + UndefinedBehaviorSanitizer and, separately, ThreadSanitizer into
``build/sanitize-*``; a subset of tests/test_ops.py and tests/test_emulated.py runs against
each in a subprocess, and any sanitizer report fails the test.

By default the fast subset runs (CI). ``QCS_SANITIZE_PROFILE=full`` runs every op test
(slow ones included) under each sanitizer instead, which takes much longer:
``QCS_SANITIZE_PROFILE=full .venv/bin/python -m pytest tests/test_sanitizers.py``.
Skipped without g++ and its sanitizer runtimes, except in CI, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qcs_tools import sanitize

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
PROFILE = os.environ.get("QCS_SANITIZE_PROFILE", "fast")
SANITIZE_DIR = ROOT / "csrc" / "emulation" / "sanitize"


def _require_toolchain(name: str) -> None:
    problem = None
    if not sys.platform.startswith("linux"):
        problem = "sanitizer runs need Linux"
    elif shutil.which(sanitize._cxx()) is None:
        problem = f"no C++ compiler ({sanitize._cxx()})"
    else:
        try:
            sanitize.runtime_path(sanitize.SANITIZERS[name])
        except RuntimeError as exc:
            problem = str(exc)
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)


# At least this many tests must pass (so a selection that silently matches nothing, or a
# run that stops early without a report, cannot pass). Fast: 153 with AVX-512, 97 with
# neither AVX-512 nor AVX2 (CPU tests run once per instruction set); full: 535 and 375.
MIN_PASSED = {"fast": 90, "full": 350}


@pytest.mark.parametrize("name", list(sanitize.SANITIZERS))
def test_op_tests_under_sanitizer(name):
    if PROFILE not in ("fast", "full"):
        pytest.fail(f"QCS_SANITIZE_PROFILE must be fast or full, got {PROFILE!r}")
    _require_toolchain(name)
    res = sanitize.run_tests(name, PROFILE, echo=False)
    tail = res.output[-8000:]
    reports = "\n".join(res.reports[:20])
    assert not res.reports, f"{name}: sanitizer reports:\n{reports}\n{tail}"
    assert res.returncode == 0, f"{name}: pytest exited with {res.returncode}\n{tail}"
    assert res.failed == 0 and res.passed >= MIN_PASSED[PROFILE], (res.passed, res.failed, tail)
    print(f"{name} ({PROFILE}): {res.passed} passed, {res.skipped} skipped in {res.seconds:.0f} s")


def _build_control(tmp_path: Path, with_shim: bool) -> Path:
    exe = tmp_path / ("control_shim" if with_shim else "control_plain")
    sources = [ROOT / "tests" / "cpp" / "tsan_openmp_control.cpp"]
    if with_shim:
        sources.append(SANITIZE_DIR / "tsan_openmp.cpp")
    cmd = [sanitize._cxx(), "-std=c++20", "-O1", "-g", "-fopenmp", "-fsanitize=thread",
           *map(str, sources), "-ldl", "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _run_control(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_tsan_openmp_annotations_are_needed_and_hide_no_races(tmp_path):
    """The TSan build's OpenMP shim (tsan_openmp.cpp) against its controls: a correct
    at::parallel_for-shaped program is clean with it and reported without it (libgomp's
    fork/join is invisible to TSan), and a race between region members is still
    reported with it."""
    _require_toolchain("tsan")
    shim = _build_control(tmp_path, with_shim=True)
    clean = _run_control(shim)
    assert clean.returncode == 0 and "ThreadSanitizer" not in clean.stderr, clean.stderr[-4000:]
    racy = _run_control(shim, "race")
    race = "WARNING: ThreadSanitizer: data race"
    assert racy.returncode == 66 and race in racy.stderr, racy.stderr[-4000:]
    # reported inside the region's outlined body (the unsynchronised `counter += 1`)
    assert "SUMMARY: ThreadSanitizer: data race" in racy.stderr and "_omp_fn" in racy.stderr
    plain = _run_control(_build_control(tmp_path, with_shim=False))
    assert plain.returncode == 66 and race in plain.stderr, plain.stderr[-4000:]


def test_tsan_sees_the_ops_parallel_for_threads():
    """Negative control on the real extension: with the OpenMP annotations switched off,
    TSan must report the at::parallel_for of the CPU op (so the clean run above checked
    multithreaded code that TSan watches, not a single-threaded or unwatched one)."""
    _require_toolchain("tsan")
    res = sanitize.run_tests("tsan", "full", ["-k", "test_results_do_not_depend_on_thread_count"],
                             echo=False, env_extra={"QCS_TSAN_OPENMP_ANNOTATIONS": "0"},
                             tag="control")
    summaries = [line for line in res.reports
                 if line.startswith("SUMMARY: ThreadSanitizer: data race")]
    assert summaries and "csrc/cpu/" in summaries[0], res.output[-6000:]
    assert res.returncode == 66, res.returncode


def test_asan_environment_reports_and_exits():
    """Positive control of the ASan run's environment (preload, options, exit code): a heap
    overflow through an intercepted libc call in that environment is reported and ends
    the process with exit code 86, which run_tests() treats as a failure."""
    _require_toolchain("asan")
    env = sanitize.run_env("asan", sanitize.build("asan", verbose=False))
    # 4096 bytes (> 512): malloc, not pymalloc
    code = ("import ctypes; buf = ctypes.create_string_buffer(4096); "
            "ctypes.memset(ctypes.addressof(buf), 0, 4096 + 64)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 86, (proc.returncode, proc.stderr[-3000:])
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr
    assert any(m in proc.stderr for m in sanitize.REPORT_MARKERS)
