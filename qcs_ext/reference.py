"""Plain-PyTorch reference of Cross Similarity Attention (CSA).

This module is ``docs/csa-spec.md`` written as code: it is the oracle the fused CPU
and CUDA kernels are tested against, and the ``backend="reference"`` path of the
``qcs_ext.nn`` modules. It favours readability over speed; autograd provides its
backward.

Shapes: ``B`` batch, ``N`` tokens, ``C`` channels. Branch order is always
``a`` (anchor), ``p`` (positive), ``n`` (negative), ``n2`` (second negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import SCOPES, check_choice, check_cross_args, check_features

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "sdpa_cross_attention"]


def _distance(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[B, N, C] x [B, N, C] -> [B, N, N]``: Euclidean distance between every row token
    of ``rows`` and every column token of ``cols``."""
    return torch.cdist(rows, cols)


def _extreme(dist: torch.Tensor, scope: str, largest: bool) -> torch.Tensor:
    """Max or min over the whole batch (``scope="batch"``) or per sample, broadcastable."""
    reduce = torch.amax if largest else torch.amin
    if scope == "batch":
        return reduce(dist)
    return reduce(dist, dim=(1, 2), keepdim=True)


def _similarity(dist: torch.Tensor, scope: str) -> torch.Tensor:
    """Same-class shift: ``S = max(D) - D`` (>= 0, large where tokens are alike)."""
    return _extreme(dist, scope, largest=True) - dist


def _cross_distance(dist: torch.Tensor, scope: str) -> torch.Tensor:
    """Cross-class shift: ``E = D - min(D)`` (>= 0, large where tokens differ)."""
    return dist - _extreme(dist, scope, largest=False)


def _cols(matrix: torch.Tensor) -> torch.Tensor:
    """``[B, N, N] -> [B, N]``: normalise each row, sum over rows (scores the column axis)."""
    return F.normalize(matrix, dim=2).sum(dim=1)


def _rows(matrix: torch.Tensor) -> torch.Tensor:
    """``[B, N, N] -> [B, N]``: normalise each column, sum over columns (scores the row axis)."""
    return F.normalize(matrix, dim=1).sum(dim=2)


def cross_similarity_maps(
    qk: torch.Tensor,
    theta: torch.Tensor,
    *,
    gamma: float = 1.0,
    mode: str = "sd",
    scope: str = "batch",
) -> torch.Tensor:
    """Quadruplet CSA maps (QCS).

    Args:
        qk: ``[4, B, N, C]`` query/key features of the branches ``a, p, n, n2``.
        theta: 0-dim learnable scalar; the fusion weight is ``k = gamma + tanh(theta)``.
        gamma: fixed offset of the fusion weight (1.0 in the paper).
        mode: ``"sd"`` (``s + k*d``), ``"s"`` (same-class term only) or ``"d"``
            (cross-class term only, unweighted; theta then has no effect).
        scope: ``"batch"`` (shift extremes over the whole batch, as published) or
            ``"sample"`` (per sample: every sample independent of its batch).

    Returns:
        ``[4, B, N]`` attention maps, each row a softmax over the ``N`` tokens.
    """
    qk, theta, gamma, mode, scope = check_cross_args(qk, theta, gamma, mode, scope)

    a, p, n, n2 = qk.unbind(0)
    s_pa = _similarity(_distance(p, a), scope)
    s_n2n = _similarity(_distance(n2, n), scope)
    e_na = _cross_distance(_distance(n, a), scope)
    e_n2p = _cross_distance(_distance(n2, p), scope)

    s = torch.stack([_cols(s_pa), _rows(s_pa), _cols(s_n2n), _rows(s_n2n)])
    d = torch.stack([_cols(e_na), _cols(e_n2p), _rows(e_na), _rows(e_n2p)])
    if mode == "s":
        score = s
    elif mode == "d":
        score = d
    else:
        score = s + (gamma + torch.tanh(theta)) * d
    return torch.softmax(score, dim=-1)


def pair_similarity_maps(qk2: torch.Tensor, *, scope: str = "batch") -> torch.Tensor:
    """Pair CSA maps (DCS): only ``S_pa``, same-class term.

    Args:
        qk2: ``[2, B, N, C]`` query/key features of the branches ``a, p``.
        scope: ``"batch"`` or ``"sample"``, as in :func:`cross_similarity_maps`.

    Returns:
        ``[2, B, N]``: ``softmax(cols(S_pa))`` for ``a`` and ``softmax(rows(S_pa))`` for ``p``.
    """
    qk2 = check_features(qk2, "qk2", 2)
    scope = check_choice(scope, "scope", SCOPES)
    a, p = qk2.unbind(0)
    s_pa = _similarity(_distance(p, a), scope)
    return torch.softmax(torch.stack([_cols(s_pa), _rows(s_pa)]), dim=-1)


# Query branch <- key/value branch, one pair per CSA distance matrix (D_pa, D_n2n, D_na, D_n2p).
SDPA_PAIRS = ((1, 0), (3, 2), (2, 0), (3, 1))


def sdpa_cross_attention(qk: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's SDPA ablation baseline on the same image pairs as CSA.

    For each pair of :data:`SDPA_PAIRS` the query comes from one image and the keys and
    values from the other: ``softmax(q k^T / sqrt(C)) v``.

    Args:
        qk: ``[4, B, N, C]`` (or ``[2, B, N, C]`` for the pair network: one pair, p <- a).
        v: values, same shape as ``qk``; defaults to ``qk``.

    Returns:
        ``[P, B, N, C]`` attended values, one slice per pair (``P = 4``, or 1 for a pair).
    """
    branches = qk.shape[0] if isinstance(qk, torch.Tensor) and qk.dim() == 4 else 4
    qk = check_features(qk, "qk", 4 if branches != 2 else 2)
    v = qk if v is None else v
    if v.shape != qk.shape:
        raise ValueError(f"v must have the shape of qk {tuple(qk.shape)}, got {tuple(v.shape)}")
    pairs = SDPA_PAIRS if qk.shape[0] == 4 else ((1, 0),)
    query = qk[[q for q, _ in pairs]]
    key = qk[[k for _, k in pairs]]
    value = v[[k for _, k in pairs]]
    return F.scaled_dot_product_attention(query, key, value)
