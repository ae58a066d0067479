"""qcs-ext: Cross Similarity Attention (QCS, AAAI 2025) as fused PyTorch ops.

Public API:

- :func:`cross_similarity_maps` ``([4, B, N, C], theta) -> [4, B, N]`` (QCS, fused kernels)
- :func:`pair_similarity_maps` ``([2, B, N, C]) -> [2, B, N]`` (DCS, fused kernels)
- :mod:`qcs_ext.reference`: the same functions in plain PyTorch, and the SDPA baseline
- :mod:`qcs_ext.nn`: the cross modules of the QCS / DCS networks
"""

from . import reference
from .ops import cross_similarity_maps, has_fused_kernel, pair_similarity_maps

__all__ = [
    "cross_similarity_maps",
    "pair_similarity_maps",
    "has_fused_kernel",
    "reference",
]
__version__ = "0.1.0"
