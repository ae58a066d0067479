"""The PCD family: :class:`qcs.models.pcd.PCD` (IR50 image features, landmark features from
heat maps or a frozen landmark network, cross-feature blocks) with ``CE + neaa_weight *
NeAA``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, UsageError
from .base import DataNeeds, Family, Losses
from .qcs import ir50_checks

if TYPE_CHECKING:  # the network is imported when first built: the config stays light
    import torch

    from ..models.outputs import BranchOutput
    from ..models.pcd import PCD
    from ..models.weights import LoadReport

__all__ = ["FAMILY", "PCDConfig", "PCDFamily"]

LANDMARK_SOURCES = ("heatmap", "mobilefacenet")


@dataclass
class PCDConfig:
    """The ``[pcd]`` section: the IR50 image backbone, the token width and blocks, the
    landmark source and the NeAA loss."""

    backbone_depths: list[int] = field(default_factory=lambda: [3, 4, 14])
    backbone_widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    backbone_size: int = 112              # the backbone resizes its input to this (paper: 112)
    backbone_resize: str = "nearest"      # nearest (as published) | antialias (explicit opt-in)
    embed_dim: int = 768
    vit_depth: int = 2                    # cross-feature blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    landmarks: str = "heatmap"            # heatmap (stored beside the images) | mobilefacenet
    heatmap_channels: int = 3             # left eye, right eye, mouth
    landmark_widths: list[int] = field(default_factory=lambda: [64, 64, 128])
    landmark_weights: str = ""            # frozen MobileFaceNet-style weights (user file)
    neutral_class: int = -1               # NeAA's neutral class; -1: the class named neutral
    neaa_weight: float = 0.01


class PCDFamily(Family):
    """PCD: single images (plus heat maps with ``landmarks = "heatmap"``), NeAA loss, IR50
    pretrained weights and optional landmark-network weights."""

    name = "pcd"
    section = PCDConfig

    def checks(self, sec: PCDConfig) -> list[tuple[str, bool, str]]:
        return [
            ("landmarks", sec.landmarks in LANDMARK_SOURCES, "heatmap or mobilefacenet"),
            ("landmark_widths", len(sec.landmark_widths) == 3, "three widths"),
            *ir50_checks(sec),
            ("backbone_size", sec.backbone_size >= 8 and sec.backbone_size % 8 == 0,
             "a multiple of 8 (the stage-3 map is backbone_size / 8)"),
        ]

    def resolve(self, sec: PCDConfig, classes: tuple[str, ...]) -> None:
        if sec.neutral_class < 0:  # NeAA: by class name
            names = [c.lower() for c in classes]
            sec.neutral_class = names.index("neutral") if "neutral" in names else -1

    def data_needs(self, sec: PCDConfig) -> DataNeeds:
        return DataNeeds(heatmap_channels=sec.heatmap_channels
                         if sec.landmarks == "heatmap" else 0)

    def build(self, sec: PCDConfig, num_classes: int) -> PCD:
        from ..models.pcd import PCD
        return PCD(sec, num_classes)

    def loss(self, out: BranchOutput, labels: torch.Tensor, sec: PCDConfig) -> Losses:
        import torch.nn.functional as F

        from ..models.fer_losses import neaa_loss
        y = labels.reshape(-1)
        logits = out.logits.float().reshape(len(y), -1)
        ce = F.cross_entropy(logits, y)
        ne = neaa_loss(out.features.float(), logits, y, sec.neutral_class)
        return Losses(ce + sec.neaa_weight * ne,
                      {"base": float(ce.detach()), "neaa": float(ne.detach())})

    def load_pretrained(self, model: PCD, path: str | Path) -> LoadReport:
        """IR50 weights into the image backbone (see
        :func:`qcs.models.ir50.load_backbone_weights`)."""
        from ..models.ir50 import load_backbone_weights
        return load_backbone_weights(model.ir_back, path)

    def load_extra_weights(self, model: PCD, sec: PCDConfig) -> list[LoadReport]:
        """``pcd.landmark_weights`` into the frozen landmark trunk (names as in
        :class:`qcs.models.pcd.LandmarkNet`; ``module.`` / ``landmark_net.`` dropped)."""
        from ..models.weights import load_matching
        if not sec.landmark_weights:
            return []
        if model.landmark_net is None:
            raise ConfigError("pcd.landmark_weights given but pcd.landmarks is 'heatmap'")
        return [load_matching(model.landmark_net, sec.landmark_weights,
                              prefixes=("module.", "landmark_net."), what="landmark trunk",
                              require_match=True)]

    def input_error(self, channels: int, base) -> UsageError | None:
        """None for RGB and for RGB + 1 or 3 landmark heat maps (eyes, mouth), which
        ``qcs predict`` draws from the landmarks it detects (:mod:`qcs.faces`)."""
        if channels in (3, 4, 6):
            return None
        err = super().input_error(channels, base)
        return UsageError(f"{err}; qcs predict draws 1 or 3 landmark heat maps (eyes, mouth), "
                          "or train PCD with pcd.landmarks=\"mobilefacenet\"")


FAMILY = PCDFamily()
