"""The DAN family: :class:`qcs.models.dan.DAN` (ResNet FCN, multi-head attention, attention
fusion) with ``CE + affinity_weight * L_af + partition_weight * L_pt``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Family, Losses

if TYPE_CHECKING:  # the network is imported when first built: the config stays light
    import torch

    from ..models.dan import DAN
    from ..models.outputs import BranchOutput
    from ..models.weights import LoadReport

__all__ = ["FAMILY", "DANConfig", "DANFamily"]


@dataclass
class DANConfig:
    """The ``[dan]`` section: the ResNet trunk (resnet18: ``[2, 2, 2, 2]``,
    ``[64, 128, 256, 512]``), the number of attention heads and the loss weights."""

    resnet_layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    heads: int = 4                        # MAN cross-attention heads
    backbone_size: int = 112              # inputs are resized to this (paper: 224)
    affinity_weight: float = 1.0          # lambda1
    partition_weight: float = 1.0         # lambda2


class DANFamily(Family):
    """DAN: single images, its own auxiliary losses, ResNet-18 weights in torchvision
    naming."""

    name = "dan"
    section = DANConfig

    def checks(self, sec: DANConfig) -> list[tuple[str, bool, str]]:
        return [
            ("resnet_layers", len(sec.resnet_layers) == 4
             and all(n >= 1 for n in sec.resnet_layers), "four block counts >= 1"),
            ("resnet_widths", len(sec.resnet_widths) == 4
             and all(w >= 1 for w in sec.resnet_widths), "four widths >= 1"),
            ("heads", sec.heads >= 1, ">= 1"),
        ]

    def upgrade_legacy(self, flat: dict[str, Any]) -> dict[str, Any]:
        out = super().upgrade_legacy({k: v for k, v in flat.items() if k != "heads"})
        if "dan_heads" in flat:
            out["heads"] = flat["dan_heads"]
        return out

    def build(self, sec: DANConfig, num_classes: int) -> DAN:
        from ..models.dan import DAN
        return DAN(sec, num_classes)

    def loss(self, out: BranchOutput, labels: torch.Tensor, sec: DANConfig) -> Losses:
        import torch.nn.functional as F

        from ..models.fer_losses import affinity_loss, partition_loss
        y = labels.reshape(-1)
        logits = out.logits.float().reshape(len(y), -1)
        ce = F.cross_entropy(logits, y)
        af = affinity_loss(out.features.float(), y, out.extras["centers"].float())
        pt = partition_loss(out.extras["heads"].float())
        total = ce + sec.affinity_weight * af + sec.partition_weight * pt
        return Losses(total, {"base": float(ce.detach()), "affinity": float(af.detach()),
                              "partition": float(pt.detach())})

    def load_pretrained(self, model: DAN, path: str | Path) -> LoadReport:
        """ResNet-18 weights (torchvision naming; a ``fc.*`` head is left unused and
        ``module.`` / ``features.`` / ``backbone.`` prefixes are dropped) into the FCN."""
        from ..models.weights import load_matching
        return load_matching(model.features, path, prefixes=("module.", "features.", "backbone."),
                             what="ResNet trunk", require_match=True)


FAMILY = DANFamily()
