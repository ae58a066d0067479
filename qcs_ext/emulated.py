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

from .ops import OpBinding  # noqa: E402

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "ops"]

_binding = OpBinding(
    "qcs_emulated",
    {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16)},
)
ops = _binding.ops
cross_similarity_maps = _binding.cross_similarity_maps
pair_similarity_maps = _binding.pair_similarity_maps
