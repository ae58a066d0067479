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

try:
    from . import _emulated  # noqa: F401  (importing it registers the qcs_emulated ops)
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    raise ImportError(
        "qcs_ext._emulated is not built: rebuild qcs-ext with the emulated CUDA kernels, "
        "e.g. `QCS_BUILD_EMULATION=1 bash scripts/bootstrap.sh` "
        "(or `QCS_BUILD_EMULATION=1 pip install --no-build-isolation -e .`)"
    ) from exc

from .ops import OpBinding

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "ops"]

_binding = OpBinding(
    "qcs_emulated",
    {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16)},
    image_device="cpu",  # the emulated kernels play CUDA kernels on the CPU
)
ops = _binding.ops
cross_similarity_maps = _binding.cross_similarity_maps
pair_similarity_maps = _binding.pair_similarity_maps
