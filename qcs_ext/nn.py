"""The cross modules of the QCS and DCS networks (``docs/models.md``).

Each module takes the token features of all branches stacked in the first dimension and
returns refined features of the same shape::

    h = LayerNorm1(x); [qk, v] = Linear(C, 2C)(h)
    maps = CSA(qk)                               # [branches, B, N]
    h = h + maps[..., None] * v
    h = LayerNorm2(h); out = h + MLP(h)          # MLP: C -> 4C -> C, GELU

That is ``residual="normed"``: the residual stream is the normalised input, as in the
published QCS modules and the 7-class DCS modules. ``residual="input"`` keeps the input
itself as the stream (``h = x + maps * v; out = h + MLP(LayerNorm2(h))``), as in the
published 8-class DCS modules (FERPlus, AffectNet-8); the weights are the same.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from . import ops, reference
from ._checks import MODES, SCOPES, check_choice, check_gamma

__all__ = ["BACKENDS", "RESIDUALS", "CrossSimilarity", "PairSimilarity"]

BACKENDS = ("auto", "fused", "reference")
RESIDUALS = ("normed", "input")


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class _SimilarityBlock(nn.Module, abc.ABC):
    """Shared body of the quadruplet and pair modules."""

    branches: int

    def __init__(self, dim: int, *, scope: str, backend: str, mlp_ratio: float, dropout: float,
                 residual: str = "normed"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.scope = check_choice(scope, "scope", SCOPES)
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.residual = check_choice(residual, "residual", RESIDUALS)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dropout)

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.backend == "reference":
            return False
        available = ops.has_fused_kernel(x.device)
        if self.backend == "fused" and not available:
            raise RuntimeError(f"backend='fused' but qcs_ext has no fused kernel for {x.device}")
        return available

    @abc.abstractmethod
    def _maps(self, qk: torch.Tensor, fused: bool) -> torch.Tensor:
        """``[branches, B, N, C] -> [branches, B, N]`` CSA maps of the qk features."""

    def forward(self, x: torch.Tensor, *, return_maps: bool = False):
        """``[branches, B, N, C] -> [branches, B, N, C]``; with ``return_maps`` also the
        ``[branches, B, N]`` CSA maps."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != self.branches:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [{self.branches}, B, N, {self.dim}], got {shape}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} channels, the module was built for {self.dim}")
        h = self.norm1(x)
        qk, v = self.qkv(h).chunk(2, dim=-1)
        maps = self._maps(qk, self._use_fused(x))
        if self.residual == "normed":
            h = self.norm2(h + maps.unsqueeze(-1) * v)
            out = h + self.mlp(h)
        else:
            h = x + maps.unsqueeze(-1) * v
            out = h + self.mlp(self.norm2(h))
        return (out, maps) if return_maps else out


class CrossSimilarity(_SimilarityBlock):
    """QCS cross module on ``[4, B, N, C]`` features (branches a, p, n, n2).

    Args:
        dim: channels ``C``.
        gamma: fixed offset of the fusion weight ``k = gamma + tanh(theta)``.
        mode: ``"sd"``, ``"s"`` or ``"d"`` (see :func:`qcs_ext.reference.cross_similarity_maps`).
        scope: ``"batch"`` or ``"sample"``.
        backend: ``"fused"`` (native kernels), ``"reference"`` (plain PyTorch) or
            ``"auto"`` (fused where a kernel exists for the input's device).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        dropout: dropout in the MLP.
        residual: ``"normed"`` (the published modules) or ``"input"`` (see the module
            docstring).
    """

    branches = 4

    def __init__(self, dim: int, *, gamma: float = 1.0, mode: str = "sd", scope: str = "batch",
                 backend: str = "auto", mlp_ratio: float = 4.0, dropout: float = 0.0,
                 residual: str = "normed") -> None:
        super().__init__(dim, scope=scope, backend=backend, mlp_ratio=mlp_ratio, dropout=dropout,
                         residual=residual)
        self.gamma = check_gamma(gamma)
        self.mode = check_choice(mode, "mode", MODES)
        self.theta = nn.Parameter(torch.zeros(()))

    def _maps(self, qk: torch.Tensor, fused: bool) -> torch.Tensor:
        fn: Callable = ops.cross_similarity_maps if fused else reference.cross_similarity_maps
        return fn(qk, self.theta.to(qk.dtype), gamma=self.gamma, mode=self.mode, scope=self.scope)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, gamma={self.gamma}, mode={self.mode!r}, scope={self.scope!r}, "
                f"backend={self.backend!r}, residual={self.residual!r}")


class PairSimilarity(_SimilarityBlock):
    """DCS cross module on ``[2, B, N, C]`` features (branches a, p); same arguments as
    :class:`CrossSimilarity` minus ``gamma`` and ``mode`` (the pair uses ``S_pa`` only)."""

    branches = 2

    def __init__(self, dim: int, *, scope: str = "batch", backend: str = "auto",
                 mlp_ratio: float = 4.0, dropout: float = 0.0, residual: str = "normed") -> None:
        super().__init__(dim, scope=scope, backend=backend, mlp_ratio=mlp_ratio, dropout=dropout,
                         residual=residual)

    def _maps(self, qk: torch.Tensor, fused: bool) -> torch.Tensor:
        fn: Callable = ops.pair_similarity_maps if fused else reference.pair_similarity_maps
        return fn(qk, scope=self.scope)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, scope={self.scope!r}, backend={self.backend!r}, "
                f"residual={self.residual!r}")
