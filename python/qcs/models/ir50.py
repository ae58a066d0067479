"""IR50 backbone (ArcFace-style improved residual network), stages 1-3 only.

Module names follow the widely shared IR50 checkpoints (``input_layer``, ``body.<i>``
with ``shortcut_layer`` / ``res_layer``), so a user's MS-Celeb-1M weights load by name.
Depths and widths are configurable; the paper uses depths (3, 4, 14), widths
(64, 128, 256) and resizes the input to 112 px inside the backbone with nearest-neighbour
sampling (what the published code does, so converted checkpoints compute the published
network). An antialiased bilinear resize is available as an explicit option
(``qcs.backbone_resize = "antialias"``) for training from scratch; no paper preset uses it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import LoadReport, load_matching

__all__ = ["IR50", "RESIZE_MODES", "LoadReport", "load_backbone_weights"]

RESIZE_MODES = ("nearest", "antialias")  # nearest: as published; antialias: bilinear, antialiased


class BottleneckIR(nn.Module):
    """``[B, Cin, H, W] -> [B, Cout, H/stride, W/stride]``: BN-conv-PReLU-conv-BN plus a
    shortcut (identity / 1x1-strided max-pool when channels match, else conv1x1 + BN)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if in_ch == out_ch:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)


class IR50(nn.Module):
    """``[B, 3, H, W] -> three maps [B, w_i, S/2^(i+1), S/2^(i+1)]`` with ``S = input_size``.

    Args:
        depths: units per stage (each stage's first unit has stride 2).
        widths: channels per stage.
        input_size: the image is resized to ``input_size`` px first (paper: 112).
        resize: how: ``"nearest"`` (the published network's ``F.interpolate`` default) or
            ``"antialias"`` (bilinear with antialiasing; an explicit opt-in).
    """

    def __init__(self, depths=(3, 4, 14), widths=(64, 128, 256), input_size: int = 112,
                 resize: str = "nearest") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.input_size, self.resize = input_size, resize
        self.widths = tuple(widths)
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.PReLU(widths[0]))
        units, in_ch, self.stage_ends = [], widths[0], []
        for depth, width in zip(depths, widths):
            for i in range(depth):
                units.append(BottleneckIR(in_ch, width, 2 if i == 0 else 1))
                in_ch = width
            self.stage_ends.append(len(units))
        # one flat Sequential, as in the published checkpoints (body.0 ... body.20)
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            if self.resize == "nearest":
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                  antialias=True)
        x = self.input_layer(x)
        outs, start = [], 0
        for end in self.stage_ends:
            x = self.body[start:end](x)
            outs.append(x)
            start = end
        return outs


def flat_body_key(key: str, stage_ends: tuple[int, ...]) -> str:
    """``body<s>.<j>.*`` (the QCS / POSTER++ backbone's per-stage names, as in a published
    QCS checkpoint's ``ir_back``) -> our flat ``body.<i>.*``; other keys unchanged."""
    m = re.match(r"^body([123])\.(\d+)\.(.*)$", key)
    if m is None:
        return key
    start = (0, *stage_ends)[int(m[1]) - 1]
    return f"body.{start + int(m[2])}.{m[3]}"


def load_backbone_weights(backbone: IR50, path: str | Path) -> LoadReport:
    """Load IR50 weights from ``.pth`` (``weights_only=True``) or ``.safetensors`` into
    ``backbone``, stripping ``module.`` / ``ir_back.`` / ``backbone.`` prefixes; per-stage
    ``body1/2/3`` names map onto our flat ``body``. Keys of a whole-model checkpoint that
    belong to the backbone (``ir_back.*``) are picked out. Tensors with the wrong shape are
    skipped; the :class:`LoadReport` lists them."""
    rename = functools.partial(flat_body_key, stage_ends=tuple(backbone.stage_ends))
    return load_matching(backbone, path, prefixes=("module.", "ir_back.", "backbone."),
                         select=("ir_back.", "module.ir_back."), what="backbone weights",
                         rename=rename)
