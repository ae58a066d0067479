"""The QCS family: the QCS (quadruplets, 4 branches), DCS (pairs, 2) and baseline (1)
networks of :mod:`qcs.models.network`, selected by ``qcs.variant``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models.variants import BRANCHES
from .base import DataNeeds, Family, Losses

if TYPE_CHECKING:  # the networks are imported when first built: the config stays light
    import torch
    from torch import nn

    from ..models.network import QCSNet
    from ..models.outputs import BranchOutput
    from ..models.weights import LoadReport

__all__ = ["FAMILY", "QCSConfig", "QCSFamily"]

_CROSS_PREFIXES = ("cross.", "vit_cross.")


@dataclass
class QCSConfig:
    """The ``[qcs]`` section: network shape and loss of the QCS / DCS / baseline networks."""

    variant: str = "qcs"                  # qcs (4 branches) | dcs (2) | baseline (no cross branch)
    backbone_depths: list[int] = field(default_factory=lambda: [3, 4, 14])  # IR50 stages 1-3
    backbone_widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    backbone_size: int = 112              # the backbone resizes its input to this (paper: 112)
    backbone_resize: str = "nearest"      # nearest (as published) | antialias (explicit opt-in)
    embed_dim: int = 768
    tokens_side: int = 7                  # each level is embedded to side x side tokens
    vit_depth: int = 2
    vit_cross_depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0                  # ViT_base dropout (and the others' when they are < 0)
    vit_cross_dropout: float = -1.0       # ViT_cross dropout; < 0: qcs.dropout
    cross_mlp_dropout: float = -1.0       # the cross modules' MLP dropout; < 0: qcs.dropout
    attn_proj_dropout: bool = True        # the ViTs' dropout also after the attention projection
    attn_dropout: float = 0.0
    csa_gamma: float = 1.0
    csa_mode: str = "sd"
    csa_scope: str = "batch"
    cross_residual: str = "normed"  # normed (published QCS, 7-class DCS) | input (8-class DCS)
    backend: str = "auto"  # qcs_ext backend: auto | fused | reference
    distill: str = "none"  # none | kl | mse (between base and cross logits)
    distill_weight: float = 0.0
    temperature: float = 1.0  # KL temperature


def _power_of_two_ratio(value: int, unit: int) -> bool:
    ratio, rest = divmod(value, unit)
    return rest == 0 and ratio >= 1 and ratio & (ratio - 1) == 0


def ir50_checks(sec: Any) -> list[tuple[str, bool, str]]:
    """Checks of the IR50 backbone fields shared by the QCS and PCD sections."""
    return [
        (
            "backbone_resize",
            sec.backbone_resize in ("nearest", "antialias"),
            "nearest (as published) or antialias",
        ),
        (
            "backbone_depths",
            len(sec.backbone_depths) == 3 and all(d >= 1 for d in sec.backbone_depths),
            "three depths >= 1",
        ),
        (
            "backbone_widths",
            len(sec.backbone_widths) == 3 and all(w >= 1 for w in sec.backbone_widths),
            "three widths >= 1",
        ),
        ("embed_dim", sec.heads >= 1 and sec.embed_dim % sec.heads == 0, "a multiple of heads"),
    ]


class QCSFamily(Family):
    """QCS / DCS / baseline: tuples of ``BRANCHES[variant]`` images, cross-entropy of the
    base and cross logits (plus optional distillation), IR50 pretrained weights; inference
    runs the base network alone."""

    name = "qcs"
    section = QCSConfig

    def checks(self, sec: QCSConfig) -> list[tuple[str, bool, str]]:
        return [
            ("variant", sec.variant in BRANCHES, f"one of {tuple(BRANCHES)}"),
            ("csa_mode", sec.csa_mode in ("sd", "s", "d"), "sd, s or d"),
            ("csa_scope", sec.csa_scope in ("batch", "sample"), "batch or sample"),
            ("cross_residual", sec.cross_residual in ("normed", "input"), "normed or input"),
            ("dropout", 0 <= sec.dropout < 1, "in [0, 1)"),
            ("vit_cross_dropout", sec.vit_cross_dropout < 1, "< 1 (negative: qcs.dropout)"),
            ("cross_mlp_dropout", sec.cross_mlp_dropout < 1, "< 1 (negative: qcs.dropout)"),
            ("backend", sec.backend in ("auto", "fused", "reference"), "auto, fused or reference"),
            *ir50_checks(sec),
            (
                "backbone_size",
                _power_of_two_ratio(sec.backbone_size, 8 * sec.tokens_side),
                "8 * tokens_side * 2^k (paper: 112 = 8 * 7 * 2; tiny: 56)",
            ),
            ("distill", sec.distill in ("none", "kl", "mse"), "none, kl or mse"),
        ]

    def run_name(self, sec: QCSConfig) -> str:
        return sec.variant

    def data_needs(self, sec: QCSConfig) -> DataNeeds:
        # QCS / DCS draw a positive that is another image of the anchor's class
        return DataNeeds(
            branches=BRANCHES[sec.variant], min_per_class=2 if sec.variant in ("qcs", "dcs") else 1
        )

    def build(self, sec: QCSConfig, num_classes: int) -> QCSNet:
        from ..models.network import QCSNet

        return QCSNet(sec, num_classes)

    def loss(self, out: BranchOutput, labels: torch.Tensor, sec: QCSConfig) -> Losses:
        from ..models.losses import qcs_loss

        cross = None if out.cross is None else out.cross.float()
        total, parts = qcs_loss(out.logits.float(), cross, labels, sec)
        return Losses(total, parts)

    def describe(self, model: nn.Module, sec: QCSConfig, device: torch.device) -> str:
        return f"{super().describe(model, sec, device)} ({_csa_kind(model, device)})"

    def load_pretrained(self, model: QCSNet, path: str | Path) -> LoadReport:
        from ..models.ir50 import load_backbone_weights

        return load_backbone_weights(model.ir_back, path)

    def inference_section(self, sec: QCSConfig) -> QCSConfig:
        return dataclasses.replace(sec, variant="baseline")  # no cross branch at inference

    def inference_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith(_CROSS_PREFIXES)}

    def has_cross_maps(self, sec: QCSConfig) -> bool:
        return sec.variant != "baseline"


def _csa_kind(model: QCSNet, device: torch.device) -> str:
    """``fused CSA`` when the cross modules run the qcs_ext kernels on ``device``."""
    import torch

    if model.cross is None:
        return "reference CSA"
    try:
        fused = bool(model.cross[0]._use_fused(torch.empty(0, device=device)))
    except RuntimeError:
        fused = False
    return "fused CSA" if fused else "reference CSA"


FAMILY = QCSFamily()
