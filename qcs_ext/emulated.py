"""The CUDA kernels of qcs_ext run on the CPU through the host emulation layer.

``qcs_ext._emulated`` is built only with ``QCS_BUILD_EMULATION=1``: it compiles the very
kernel sources and launch code of ``csrc/cuda`` for the host (``csrc/emulation``), every
block's threads becoming host threads, and registers them as the CPU kernels of the
``qcs_emulated`` op library. It exists to test the CUDA kernels on machines without a GPU;
it is slow and not meant for training.

Public functions (same contract as :mod:`qcs_ext.reference`):
:func:`cross_similarity_maps`, :func:`pair_similarity_maps`.
"""

from __future__ import annotations

import torch

from ._native import load

_PROBLEM = load("_emulated")  # importing qcs_ext._emulated registers the qcs_emulated ops
if _PROBLEM is not None:  # pragma: no cover - depends on how the package was built
    raise ImportError(
        f"{_PROBLEM} (qcs_ext._emulated is built only with QCS_BUILD_EMULATION=1, e.g. "
        "`QCS_BUILD_EMULATION=1 bash scripts/bootstrap.sh`)")

import functools  # noqa: E402

from . import ops as _ops  # noqa: E402

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "has_kernel", "ops"]

ops = torch.ops.qcs_emulated
# The emulated kernels take every floating dtype the CUDA kernels take, on the CPU.
NATIVE_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
# The emulated runtime can answer "no kernel image for this device" like a real one.
IMAGES = _ops.KernelImages("qcs_emulated", "cpu")

# The same fake kernels and autograd as the qcs_ext library (qcs_ext/ops.py).
torch.library.register_fake("qcs_emulated::cross_similarity_forward", _ops.cross_forward_fake)
torch.library.register_fake("qcs_emulated::cross_similarity_backward", _ops.cross_backward_fake)
torch.library.register_fake("qcs_emulated::pair_similarity_forward", _ops.pair_forward_fake)
torch.library.register_fake("qcs_emulated::pair_similarity_backward", _ops.pair_backward_fake)
torch.library.register_autograd(
    "qcs_emulated::cross_similarity_forward",
    functools.partial(_ops.cross_backward,
                      torch.ops.qcs_emulated.cross_similarity_backward.default),
    setup_context=_ops.cross_setup_context,
)
torch.library.register_autograd(
    "qcs_emulated::pair_similarity_forward",
    functools.partial(_ops.pair_backward,
                      torch.ops.qcs_emulated.pair_similarity_backward.default),
    setup_context=_ops.pair_setup_context,
)


def cross_similarity_maps(
    qk: torch.Tensor,
    theta: torch.Tensor,
    *,
    gamma: float = 1.0,
    mode: str = "sd",
    scope: str = "batch",
) -> torch.Tensor:
    """:func:`qcs_ext.cross_similarity_maps` through the emulated CUDA kernels (CPU tensors)."""
    return _ops.run_cross(torch.ops.qcs_emulated.cross_similarity_forward.default, NATIVE_DTYPES,
                          IMAGES, qk, theta, gamma, mode, scope)


def pair_similarity_maps(qk2: torch.Tensor, *, scope: str = "batch") -> torch.Tensor:
    """:func:`qcs_ext.pair_similarity_maps` through the emulated CUDA kernels (CPU tensors)."""
    return _ops.run_pair(torch.ops.qcs_emulated.pair_similarity_forward.default, NATIVE_DTYPES,
                         IMAGES, qk2, scope)


def has_kernel(device: torch.device | str) -> bool:
    """Whether the emulated kernels run on ``device`` (CPU tensors with a kernel image)."""
    device = torch.device(device)
    return device.type == "cpu" and IMAGES.fits(device)
