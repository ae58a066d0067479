"""Evaluation of the base (inference) network: loss, accuracy, per-class recall and F1,
confusion matrix; per-rank shards combined under DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..logs import progress
from ..tta import predict_logits

__all__ = ["autocast", "evaluate", "metrics_from_confusion"]


def autocast(device: torch.device, amp: str):
    """The autocast context of ``train.amp`` (``none``: a no-op)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def metrics_from_confusion(confusion: torch.Tensor, loss_sum: float, count: int
                           ) -> dict[str, Any]:
    """``loss``, ``acc``, per-class ``recall`` / ``f1``, ``mean_recall`` and ``confusion``
    (a list of lists) from a ``K x K`` confusion matrix (rows: true class)."""
    cm = confusion.double()
    tp = cm.diag()
    recall = tp / cm.sum(1).clamp(min=1)
    precision = tp / cm.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"loss": loss_sum / max(count, 1), "acc": float(tp.sum() / max(count, 1)),
            "recall": recall.tolist(), "f1": f1.tolist(), "mean_recall": float(recall.mean()),
            "confusion": confusion.tolist()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, amp: str = "none",
             show_progress: bool = True, desc: str = "eval",
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             flip_tta: bool = False) -> dict[str, Any]:
    """Base-network evaluation (``model(x [B, C, H, W]) -> [B, K]``): ``loss``, ``acc``,
    per-class ``recall`` / ``f1`` (lists of ``K``), ``mean_recall`` and the ``confusion``
    matrix (``K x K``, rows = true class). ``reduce`` (DDP: a sum over ranks of a float64
    tensor) combines per-rank shards. ``flip_tta``: average the logits of each image and
    its mirror image (:mod:`qcs.tta`)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, count = 0.0, 0
    sampler = getattr(loader, "sampler", None)
    bar = progress(len(sampler) if sampler is not None else 0, desc, enabled=show_progress)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device)
        with autocast(device, amp):
            logits = predict_logits(model, x, flip_tta)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
        pred = logits.argmax(dim=1)
        confusion += torch.bincount((y * num_classes + pred).cpu(),
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        bar.update(len(y))
    bar.close()
    if reduce is not None:  # each rank saw its shard of the test set: sum counts and losses
        tot = reduce(torch.cat([confusion.flatten().double(),
                                torch.tensor([loss_sum, count], dtype=torch.float64)]))
        confusion = tot[:-2].round().long().view(num_classes, num_classes)
        loss_sum, count = float(tot[-2]), int(tot[-1])
    return metrics_from_confusion(confusion, loss_sum, count)
