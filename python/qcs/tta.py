"""Test-time augmentation: the horizontal flip.

Faces are close to mirror-symmetric and every published recipe trains with random
horizontal flips, so averaging the logits of an image and of its mirror image is a common,
cheap way to evaluate FER models. It is an option (``qcs eval --flip-tta``, ``qcs predict
--flip-tta``), never the default: the paper's figures are single-view.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["flip_tta_logits", "predict_logits"]


def flip_tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, K]``: the mean of ``model(x)`` and ``model(x mirrored)``
    (logits averaged, so a softmax of the result is still a distribution)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"flip TTA expects RGB images [B, 3, H, W], got shape "
                         f"{tuple(x.shape)} (inputs with landmark heat-map channels would "
                         "need their left and right channels swapped)")
    return (model(x) + model(torch.flip(x, dims=[-1]))) / 2


def predict_logits(model: nn.Module, x: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
    """``model(x)``, or with ``flip_tta`` the flip-averaged logits."""
    return flip_tta_logits(model, x) if flip_tta else model(x)
