"""Argument validation shared by the reference and the fused ops.

Every public function of qcs_ext funnels its arguments through here, so a bad call gets
the same clear ``TypeError``/``ValueError`` (naming the argument and what is wrong)
whichever backend would have run it.
"""

from __future__ import annotations

import math

import torch

MODES = ("sd", "s", "d")
SCOPES = ("batch", "sample")


def check_features(qk: object, name: str, branches: int) -> torch.Tensor:
    """Check a ``[branches, B, N, C]`` feature tensor and return it."""
    if not isinstance(qk, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(qk).__name__}")
    if not qk.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {qk.dtype}")
    if qk.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions [{branches}, B, N, C], got shape {tuple(qk.shape)}"
        )
    if qk.shape[0] != branches:
        raise ValueError(
            f"{name} must hold {branches} branches in its first dimension "
            f"[{branches}, B, N, C], got shape {tuple(qk.shape)}"
        )
    for dim_name, size in zip(("B", "N", "C"), qk.shape[1:]):
        if size == 0:
            raise ValueError(f"{name} has an empty dimension {dim_name} (shape {tuple(qk.shape)})")
    return qk


def check_theta(theta: object, qk: torch.Tensor) -> torch.Tensor:
    """Check ``theta`` (one element, same dtype and device as ``qk``); return it 0-dim."""
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be a torch.Tensor (0-dim), got {type(theta).__name__}")
    if theta.numel() != 1:
        raise ValueError(f"theta must hold exactly one element, got shape {tuple(theta.shape)}")
    if theta.dtype != qk.dtype:
        raise TypeError(
            f"theta has dtype {theta.dtype} but qk has dtype {qk.dtype}; they must match")
    if theta.device != qk.device:
        raise ValueError(f"theta is on {theta.device} but qk is on {qk.device}; they must match")
    # A reshape of a 0-dim tensor would still add a view node to the autograd graph.
    return theta if theta.dim() == 0 else theta.reshape(())


def check_gamma(gamma: object) -> float:
    """Check that ``gamma`` is a finite real number and return it as a float."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    return float(gamma)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_cross_args(qk, theta, gamma, mode, scope):
    """Check the arguments of ``cross_similarity_maps``; return them normalised."""
    qk = check_features(qk, "qk", 4)
    return (qk, check_theta(theta, qk), check_gamma(gamma), check_choice(mode, "mode", MODES),
            check_choice(scope, "scope", SCOPES))
