"""Pytest plugin loaded by qcs_tools/sanitize.py (``-p qcs_tools.sanitize_pytest_plugin``).

Before any test runs it makes sure the run tests what it claims to: the sanitizer runtime
named by ``QCS_SANITIZER`` is mapped into the process, and ``qcs_ext._C`` and
``qcs_ext._emulated`` are the sanitized builds under ``QCS_SANITIZED_SITE``, not the
package's regular ones. Any mismatch stops the session with a usage error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_RUNTIMES = {"asan": "libasan", "tsan": "libtsan"}


def _check() -> str:
    name = os.environ.get("QCS_SANITIZER", "")
    site = os.environ.get("QCS_SANITIZED_SITE", "")
    if name not in _RUNTIMES or not site:
        raise pytest.UsageError("sanitize_pytest_plugin: QCS_SANITIZER / QCS_SANITIZED_SITE "
                                "not set (run through python -m qcs_tools.sanitize)")
    maps = Path("/proc/self/maps").read_text()
    if _RUNTIMES[name] not in maps:
        raise pytest.UsageError(
            f"sanitize_pytest_plugin: {_RUNTIMES[name]} is not loaded (LD_PRELOAD)")
    import qcs_ext._C
    import qcs_ext._emulated

    root = Path(site).resolve()
    for mod in (qcs_ext._C, qcs_ext._emulated):
        path = Path(mod.__file__).resolve()
        if root not in path.parents:
            raise pytest.UsageError(f"sanitize_pytest_plugin: {mod.__name__} was imported from "
                                    f"{path}, not from the sanitized build {root}")
    return f"{name}: qcs_ext._C and qcs_ext._emulated from {root}"


def pytest_configure(config):
    """Fail the session early unless the sanitized extensions are the ones imported."""
    config._qcs_sanitize_line = _check()


def pytest_report_header(config):
    """Name the sanitizer and the build in pytest's header."""
    return f"sanitized build ({config._qcs_sanitize_line})"
