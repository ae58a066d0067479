"""Training loss of the QCS / DCS / baseline networks (spec: "Outputs and loss")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["qcs_loss"]


def qcs_loss(base: torch.Tensor, cross: torch.Tensor | None, labels: torch.Tensor,
             cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over all outputs, plus an optional distillation term.

    Args:
        base: ``[R, B, K]`` base-network logits.
        cross: ``[R, B, K]`` cross-branch logits or ``None`` (baseline).
        labels: ``[R, B]`` class indices of every branch's image.
        cfg: the ``[qcs]`` section (:class:`qcs.families.qcs.QCSConfig`): ``distill``
            none | kl | mse with ``distill_weight`` and ``temperature``.
            KL is ``T^2 KL(softmax(cross/T) || softmax(base/T))`` with the cross branch as
            (detached) teacher; MSE compares the logits directly.

    Returns:
        ``(loss, parts)`` with ``parts`` = ``{"base": ..., "cross": ..., "distill": ...}``
        (Python floats, for logging the paper's Fig. 6 curves).
    """
    k = base.shape[-1]
    ce_base = F.cross_entropy(base.reshape(-1, k), labels.reshape(-1))
    parts = {"base": float(ce_base.detach())}
    if cross is None:
        return ce_base, parts
    ce_cross = F.cross_entropy(cross.reshape(-1, k), labels.reshape(-1))
    parts["cross"] = float(ce_cross.detach())
    loss = (ce_base + ce_cross) / 2  # every output weighs the same: mean over 2R logits
    if cfg.distill != "none" and cfg.distill_weight > 0:
        if cfg.distill == "kl":
            t = cfg.temperature
            extra = F.kl_div(F.log_softmax(base.reshape(-1, k) / t, dim=-1),
                             F.log_softmax(cross.detach().reshape(-1, k) / t, dim=-1),
                             reduction="batchmean", log_target=True) * t * t
        else:
            extra = F.mse_loss(base, cross.detach())
        parts["distill"] = float(extra.detach())
        loss = loss + cfg.distill_weight * extra
    return loss, parts
