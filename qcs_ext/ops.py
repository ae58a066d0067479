"""Fused CSA ops: Python wrappers, fake (meta) kernels and autograd registration.

The native kernels (``csrc/cpu``, ``csrc/cuda``) implement the ops declared in
``csrc/ops.cpp``; this module gives them the public signatures of
:mod:`qcs_ext.reference`, registers their shape functions for ``torch.compile`` and
wires the backward op into autograd.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing it registers the native ops)
from ._checks import MODES, SCOPES, check_choice, check_features, check_gamma, check_theta

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "has_fused_kernel"]

_ops = torch.ops.qcs_ext

# dtypes the kernels compute in natively; others are computed in float32 and cast back.
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def has_fused_kernel(device: torch.device | str) -> bool:
    """Whether the native extension has kernels for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "qcs_ext::cross_similarity_forward", key
    )


def _aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved distances/extrema: half types keep them in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _compute_dtype(qk: torch.Tensor) -> torch.dtype:
    native = _NATIVE_DTYPES.get(qk.device.type, ())
    return qk.dtype if qk.dtype in native else torch.float32


# ---- fake kernels: shapes and dtypes only, for torch.compile / meta tensors -------------


@torch.library.register_fake("qcs_ext::cross_similarity_forward")
def _cross_forward_fake(qk, theta, gamma, mode, scope):
    _, batch, tokens, _ = qk.shape
    aux = _aux_dtype(qk.dtype)
    return (
        qk.new_empty((4, batch, tokens)),
        qk.new_empty((4, batch, tokens, tokens), dtype=aux),
        qk.new_empty((4, batch), dtype=aux),
    )


@torch.library.register_fake("qcs_ext::cross_similarity_backward")
def _cross_backward_fake(grad_maps, maps, qk, distances, extrema, theta, gamma, mode, scope):
    return torch.empty_like(qk), torch.empty_like(theta)


@torch.library.register_fake("qcs_ext::pair_similarity_forward")
def _pair_forward_fake(qk, scope):
    _, batch, tokens, _ = qk.shape
    aux = _aux_dtype(qk.dtype)
    return (
        qk.new_empty((2, batch, tokens)),
        qk.new_empty((1, batch, tokens, tokens), dtype=aux),
        qk.new_empty((1, batch), dtype=aux),
    )


@torch.library.register_fake("qcs_ext::pair_similarity_backward")
def _pair_backward_fake(grad_maps, maps, qk, distances, extrema, scope):
    return torch.empty_like(qk)


# ---- autograd ---------------------------------------------------------------------------
# Saved for backward: qk (an input, not a copy), the maps, and the distance matrices with
# their extrema. Norms, aggregations and tie positions are recomputed from the distances.


def _cross_setup_context(ctx, inputs, output):
    qk, theta, gamma, mode, scope = inputs
    maps, distances, extrema = output
    ctx.save_for_backward(qk, theta, maps, distances, extrema)
    ctx.gamma, ctx.mode, ctx.scope = gamma, mode, scope
    ctx.mark_non_differentiable(distances, extrema)


def _cross_backward(ctx, grad_maps, _grad_distances, _grad_extrema):
    qk, theta, maps, distances, extrema = ctx.saved_tensors
    grad_qk, grad_theta = _ops.cross_similarity_backward(
        grad_maps.contiguous(), maps, qk, distances, extrema, theta, ctx.gamma, ctx.mode, ctx.scope
    )
    return grad_qk, grad_theta, None, None, None


def _pair_setup_context(ctx, inputs, output):
    qk, scope = inputs
    maps, distances, extrema = output
    ctx.save_for_backward(qk, maps, distances, extrema)
    ctx.scope = scope
    ctx.mark_non_differentiable(distances, extrema)


def _pair_backward(ctx, grad_maps, _grad_distances, _grad_extrema):
    qk, maps, distances, extrema = ctx.saved_tensors
    grad_qk = _ops.pair_similarity_backward(
        grad_maps.contiguous(), maps, qk, distances, extrema, ctx.scope
    )
    return grad_qk, None


torch.library.register_autograd(
    "qcs_ext::cross_similarity_forward", _cross_backward, setup_context=_cross_setup_context
)
torch.library.register_autograd(
    "qcs_ext::pair_similarity_forward", _pair_backward, setup_context=_pair_setup_context
)


# ---- public functions -------------------------------------------------------------------


def cross_similarity_maps(
    qk: torch.Tensor,
    theta: torch.Tensor,
    *,
    gamma: float = 1.0,
    mode: str = "sd",
    scope: str = "batch",
) -> torch.Tensor:
    """Quadruplet CSA maps with the fused kernels; same contract as
    :func:`qcs_ext.reference.cross_similarity_maps`.

    Args:
        qk: ``[4, B, N, C]`` query/key features of the branches ``a, p, n, n2``
            (any strides; float32/float64 natively, other float dtypes computed in float32).
        theta: 0-dim tensor, same dtype and device as ``qk``.
        gamma: finite float, ``k = gamma + tanh(theta)``.
        mode: ``"sd"``, ``"s"`` or ``"d"``.
        scope: ``"batch"`` or ``"sample"``.

    Returns:
        ``[4, B, N]`` softmax maps, dtype of ``qk``.
    """
    qk = check_features(qk, "qk", 4)
    theta = check_theta(theta, qk)
    gamma = check_gamma(gamma)
    mode = check_choice(mode, "mode", MODES)
    scope = check_choice(scope, "scope", SCOPES)
    compute = _compute_dtype(qk)
    maps, _, _ = _ops.cross_similarity_forward(
        qk.to(compute).contiguous(), theta.to(compute), gamma, mode, scope
    )
    return maps.to(qk.dtype)


def pair_similarity_maps(qk2: torch.Tensor, *, scope: str = "batch") -> torch.Tensor:
    """Pair CSA maps (DCS) with the fused kernels; same contract as
    :func:`qcs_ext.reference.pair_similarity_maps`.

    Args:
        qk2: ``[2, B, N, C]`` query/key features of the branches ``a, p``.
        scope: ``"batch"`` or ``"sample"``.

    Returns:
        ``[2, B, N]`` softmax maps, dtype of ``qk2``.
    """
    qk2 = check_features(qk2, "qk2", 2)
    scope = check_choice(scope, "scope", SCOPES)
    compute = _compute_dtype(qk2)
    maps, _, _ = _ops.pair_similarity_forward(qk2.to(compute).contiguous(), scope)
    return maps.to(qk2.dtype)
