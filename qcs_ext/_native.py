"""Loading the native kernels, guarded against a torch they were not built for.

A C++ extension is tied to the exact torch it was compiled against: under another torch it
fails with an opaque ``undefined symbol`` at import, or loads and misbehaves. ``setup.py``
records the build's torch in ``qcs_ext/_build_info.py``; :func:`load` compares it with the
torch that is loaded and imports the extension only when they agree. Otherwise (or when the
import itself fails) it warns once with one sentence saying which torch the build wants,
which is loaded and how to rebuild, and ``qcs_ext`` carries on without its fused kernels:
:mod:`qcs_ext.reference` and the modules of :mod:`qcs_ext.nn` (backend ``auto``) still work.
"""

from __future__ import annotations

import importlib
import types
import warnings

import torch

__all__ = ["NativeKernelWarning", "BuildInfo", "build_info", "mismatch", "load", "load_or_warn",
           "REBUILD"]

REBUILD = ("rebuild qcs-ext against the loaded torch from its source directory with "
           "`pip install --no-build-isolation --force-reinstall --no-deps .` "
           "(or `bash scripts/bootstrap.sh`)")


class NativeKernelWarning(UserWarning):
    """The native kernels were not loaded; the message says why and how to rebuild."""


class BuildInfo(types.SimpleNamespace):
    """What ``setup.py`` recorded: ``torch`` (its ``__version__``), ``cuda`` (its
    ``version.cuda``, ``None`` for a CPU build of torch) and ``with_cuda`` (whether the
    extension holds CUDA kernels)."""

    torch: str
    cuda: str | None
    with_cuda: bool

    def describe(self) -> str:
        """``"torch 2.6.0+cu124 (with CUDA kernels)"``-style text."""
        kind = "with CUDA kernels" if self.with_cuda else "CPU kernels only"
        return f"torch {self.torch} ({kind})"


def build_info() -> BuildInfo | None:
    """The recorded build, or ``None`` when the extension was built without a record
    (by an older ``setup.py``) or not built at all."""
    try:
        from . import _build_info as info
    except ImportError:
        return None
    return BuildInfo(torch=str(info.TORCH_VERSION), cuda=info.TORCH_CUDA,
                     with_cuda=bool(info.WITH_CUDA))


def _public(version: str) -> str:
    """``"2.6.0+cu124"`` -> ``"2.6.0"`` (the local label names the wheel's CUDA variant)."""
    return str(version).split("+", 1)[0]


def mismatch(info: BuildInfo, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why an extension built as ``info`` cannot be loaded into torch ``torch_version``
    (CUDA ``torch_cuda``, ``None`` for a CPU build), as one sentence; ``None`` if it can.

    The release must match exactly (torch's C++ ABI changes between releases); the local
    label may differ for CPU-only kernels, which link only torch's CPU libraries, but CUDA
    kernels need a CUDA build of torch with the same CUDA major version.
    """
    loaded = f"torch {torch_version}" + ("" if torch_cuda else " (a CPU build)")
    problem = _public(info.torch) != _public(torch_version)
    if info.with_cuda and not problem:
        problem = (
            torch_cuda is None or str(torch_cuda).split(".")[0] != str(info.cuda).split(".")[0]
        )
    if not problem:
        return None
    return (
        f"qcs_ext: the native kernels were built against {info.describe()} but "
        f"{loaded} is loaded, so the fused ops are off and only the reference ops work; "
        f"{REBUILD}"
    )


def load(module: str = "_C") -> str | None:
    """Import ``qcs_ext.<module>`` (which registers its ops) if its build suits the loaded
    torch. Returns ``None`` on success, else the one-sentence reason it was not loaded
    (the caller decides whether to warn or raise)."""
    info = build_info()
    if info is not None:
        reason = mismatch(info, torch.__version__, torch.version.cuda)
        if reason is not None:
            return reason
    try:
        importlib.import_module(f"{__package__}.{module}")
    except (ImportError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}.{module}":
            return (
                f"qcs_ext: the native kernels ({module}) are not built, so the fused ops "
                f"are off and only the reference ops work; build them with "
                f"`pip install --no-build-isolation -e .` in the qcs-ext source"
            )
        built = info.describe() if info is not None else "an unrecorded torch"
        return (
            f"qcs_ext: the native kernels ({module}) do not load ({first}); they were "
            f"built against {built} and torch {torch.__version__} is loaded, so the "
            f"fused ops are off and only the reference ops work; {REBUILD}"
        )
    return None


def load_or_warn(module: str = "_C") -> str | None:
    """:func:`load`, warning with :class:`NativeKernelWarning` when it fails."""
    reason = load(module)
    if reason is not None:
        warnings.warn(reason, NativeKernelWarning, stacklevel=2)
    return reason
