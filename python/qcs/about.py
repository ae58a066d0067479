"""What is installed: the versions a bug report needs, as printed by ``qcs --version``."""

from __future__ import annotations

import platform

from . import __version__

__all__ = ["version_text"]


def version_text() -> str:
    """One line: qcs-ext's version, Python, torch (with its CUDA), and whether the native
    kernels are loaded (with the torch they were built against), e.g.
    ``qcs 0.1.0 (qcs-ext), Python 3.11.7, torch 2.6.0+cu124 (CUDA 12.4); native kernels
    loaded (built against torch 2.6.0+cu124, CPU kernels only)``."""
    import torch

    from qcs_ext import ops
    from qcs_ext._native import build_info
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    info = build_info()
    built = f"built against {info.describe()}" if info else "build not recorded"
    native = (f"native kernels loaded ({built})" if ops.NATIVE_PROBLEM is None
              else f"native kernels off ({built})")
    return (f"qcs {__version__} (qcs-ext), Python {platform.python_version()}, "
            f"torch {torch.__version__} ({cuda}); {native}")
