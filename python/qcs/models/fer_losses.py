"""Auxiliary losses of the DAN and PCD trainer variants.

``B`` batch, ``K`` classes, ``D`` feature width, ``k`` attention heads.

- :func:`affinity_loss` (DAN, FCN): squared distance of each feature to its own class
  centre over the variance among the centres.
- :func:`partition_loss` (DAN, AFN): ``mean log(1 + k / var)`` with the variance taken
  across the ``k`` heads, per sample and channel.
- :func:`neaa_loss` (PCD): the neutral-expression-aware anchor loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["affinity_loss", "neaa_loss", "partition_loss"]


def affinity_loss(feat: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor,
                  eps: float = 1e-12) -> torch.Tensor:
    """``mean_i ||feat_i - centers[labels_i]||^2 / sigma_c^2`` (DAN eq. 2, batch-averaged).

    Args:
        feat: ``[B, D]`` pooled backbone features.
        labels: ``[B]`` class indices.
        centers: ``[K, D]`` learned class centres.

    ``sigma_c^2`` is the sum over the ``D`` dimensions of the (unbiased) variance of the
    centres across the ``K`` classes: dividing by it pushes the centres apart, while the
    numerator pulls features to their own centre.
    """
    dist = (feat - centers[labels]).pow(2).sum(dim=1)
    spread = centers.var(dim=0).sum()
    return dist.mean() / spread.clamp(min=eps)


def partition_loss(heads: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``1/(B C) sum_{i,j} log(1 + k / sigma_ij^2)`` (DAN partition loss).

    Args:
        heads: ``[B, k, C]`` head outputs (after the AFN log-softmax across heads).

    ``sigma_ij^2`` is the (unbiased) variance over the ``k`` heads of channel ``j`` of
    sample ``i``: small when the heads agree, so the loss makes them attend to different
    things. With a single head there is no variance to take; the loss is then 0.
    """
    k = heads.shape[1]
    if k < 2:
        return heads.new_zeros(())
    var = heads.var(dim=1)
    return torch.log1p(k / var.clamp(min=eps)).mean()


def neaa_loss(feat: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              neutral: int) -> torch.Tensor:
    """Neutral-expression-aware anchor loss (PCD, Sec. 3.2).

    Args:
        feat: ``[B, D]`` final features (PCD's class token).
        logits: ``[B, K]`` classifier scores; a sample's confidence is the entropy of its
            softmax (lower entropy: more confident).
        labels: ``[B]`` class indices.
        neutral: the neutral class index (``-1``: no neutral class, all classes anchored).

    ``Dist`` is the mean squared error over the ``D`` dimensions.

    - Non-neutral part: for every non-neutral class ``c`` present in the batch, the sample
      of least entropy is the anchor; ``(1/N_c) sum_{i in c} Dist(f_i, f_anchor)``, summed
      over classes. The anchor is a target, so it is detached (it is not pulled itself).
    - Neutral part: ``1/(N_n - 1)^2 sum_{i != j} Dist(f_i, f_j)`` over the ``N_n`` neutral
      samples (0 when ``N_n <= 1``): every neutral feature is pulled to every other.

    Returns the sum of both parts (a scalar).
    """
    logp = F.log_softmax(logits.detach().float(), dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    total = feat.new_zeros(())
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        f = feat[idx]
        if c == neutral:
            n = len(idx)
            if n > 1:
                # sum over ordered pairs i != j (diagonal terms are 0 anyway)
                d = (f[:, None, :] - f[None, :, :]).pow(2).mean(dim=2)
                total = total + d.sum() / (n - 1) ** 2
            continue
        anchor = f[int(torch.argmin(entropy[idx]))].detach()
        total = total + (f - anchor).pow(2).mean(dim=1).mean()
    return total
