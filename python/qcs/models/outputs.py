"""The one return type of every network's training forward (``forward_branches``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["BranchOutput"]


@dataclass
class BranchOutput:
    """What ``forward_branches(xs [R, B, C, H, W])`` returns, for every family.

    ``logits``: ``[R, B, K]`` of the base (inference) network; ``cross``: ``[R, B, K]`` of
    a cross branch, or ``None``; ``features``: ``[B, D]`` features a family's loss uses, or
    ``None``; ``extras``: any other tensors its loss needs, by name. (DDP finds the tensors
    of a dataclass output, so every parameter used here is seen as used.)"""

    logits: torch.Tensor
    cross: torch.Tensor | None = None
    features: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
