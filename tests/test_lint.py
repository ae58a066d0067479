"""Lint as a test, so CI runs it: ruff over the tracked Python files (rules and line length
in pyproject.toml) and clang-format over csrc/ (style in .clang-format). The same checks
run before each commit through .pre-commit-config.yaml.

Both tools come from PyPI with the ``test`` extra. Where one is missing the test is
skipped with the reason, except in CI, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
CXX_SUFFIXES = (".h", ".cpp", ".cu", ".cuh", ".inl")


def _missing(reason: str):
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _tracked(*patterns: str) -> list[str]:
    """Files git tracks under ROOT matching ``patterns`` (paths relative to ROOT)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        _missing("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def _tool(name: str) -> list[str] | None:
    """The command that runs ``name``: beside this Python (a venv that is not activated)
    or on PATH; ruff also as ``python -m ruff``."""
    if name == "ruff" and importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else None


def test_ruff_clean():
    ruff = _tool("ruff")
    if ruff is None:
        _missing("ruff is not installed (pip install -e '.[test]')")
    files = _tracked("*.py")
    assert files, "no tracked Python files found"
    cmd = [*ruff, "check", "--force-exclude", "--output-format", "concise", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


def test_clang_format_clean():
    clang_format = _tool("clang-format")
    if clang_format is None:
        _missing("clang-format is not installed (pip install -e '.[test]')")
    files = [f for f in _tracked("csrc") if f.endswith(CXX_SUFFIXES)]
    assert files, "no tracked C++/CUDA files under csrc/"
    proc = subprocess.run([*clang_format, "--dry-run", "-Werror", *files], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (
        "clang-format would change these files (clang-format -i FILE to apply):\n"
        + proc.stderr[-6000:])
