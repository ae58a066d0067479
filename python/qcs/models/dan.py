"""DAN, "Distract your Attention" (``docs/models.md``), as a trainer family: one definition
parameterised by the ``[dan]`` config section (:class:`qcs.families.dan.DANConfig`).

- FCN: a ResNet built from torchvision's ``BasicBlock`` with the attribute names of
  ``torchvision.models.resnet18`` (``conv1``, ``bn1``, ``layer1..4``), so MS-Celeb ResNet-18
  weights in torchvision naming load (:meth:`qcs.families.dan.DANFamily.load_pretrained`).
  At the default widths ``(64, 128, 256, 512)`` and blocks ``(2, 2, 2, 2)`` it *is* resnet18 without
  ``avgpool``/``fc``; the tiny presets shrink both.
- MAN: ``k`` cross-attention heads, each a spatial unit then a channel unit.
- AFN: log-softmax across heads, sum, ``Linear`` + ``BatchNorm1d`` classifier.

Shapes: ``B`` batch, ``C`` the last ResNet width, ``S x S`` its map, ``k`` heads, ``K``
classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .outputs import BranchOutput

if TYPE_CHECKING:
    from ..families.dan import DANConfig

__all__ = ["DAN", "ChannelAttention", "CrossAttentionHead", "ResNetFeatures", "SpatialAttention"]


class ResNetFeatures(nn.Module):
    """torchvision's ResNet trunk with configurable widths and blocks per stage:
    ``[B, 3, H, W] -> [B, widths[-1], H/32, W/32]``."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)) -> None:
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != w:
                down = nn.Sequential(nn.Conv2d(in_ch, w, 1, stride, bias=False),
                                     nn.BatchNorm2d(w))
            blocks = [BasicBlock(in_ch, w, stride, down)]
            blocks += [BasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = w
        self.out_channels = in_ch
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SpatialAttention(nn.Module):
    """``[B, C, S, S] -> [B, C, S, S]``: 1x1 reduction to ``C/2``, then 3x3, 1x3 and 3x1
    convolutions back to ``C`` summed, ReLU, summed over channels into one map that
    multiplies the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = max(channels // 2, 1)

        def conv_bn(cin, cout, k, p):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=p), nn.BatchNorm2d(cout))
        self.reduce = conv_bn(channels, mid, 1, 0)
        self.conv3x3 = conv_bn(mid, channels, 3, 1)
        self.conv1x3 = conv_bn(mid, channels, (1, 3), (0, 1))
        self.conv3x1 = conv_bn(mid, channels, (3, 1), (1, 0))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        y = self.relu(self.conv3x3(y) + self.conv1x3(y) + self.conv3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class ChannelAttention(nn.Module):
    """``[B, C, S, S] -> [B, C]``: global average pooling, a Linear-BN-ReLU-Linear-Sigmoid
    bottleneck (``C -> C/16 -> C``), multiplied into the pooled features."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        mid = max(channels // reduction, 1)
        self.gate = nn.Sequential(nn.Linear(channels, mid), nn.BatchNorm1d(mid), nn.ReLU(),
                                  nn.Linear(mid, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * self.gate(pooled)


class CrossAttentionHead(nn.Module):
    """One MAN head: ``[B, C, S, S] -> [B, C]`` (spatial unit, then channel unit)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = SpatialAttention(channels)
        self.channel = ChannelAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel(self.spatial(x))


class DAN(nn.Module):
    """DAN as a trainer variant.

    ``model(x)``: ``[B, 3, H, W] -> logits [B, K]`` (inference).
    ``model.forward_branches(xs)``: ``xs [1, B, 3, H, W]`` -> a :class:`BranchOutput` with
    ``logits [1, B, K]``, ``features [B, C]`` (pooled FCN features) and ``extras``
    ``heads [B, k, C]`` (log-softmaxed across heads) and ``centers [K, C]``; the family's
    loss is ``CE + lambda1 * affinity + lambda2 * partition``.

    Inputs are resized to ``cfg.backbone_size`` when they differ (paper: 224). No weights
    are loaded here.
    """

    def __init__(self, cfg: DANConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.size = cfg.backbone_size
        self.features = ResNetFeatures(cfg.resnet_layers, cfg.resnet_widths)
        c = self.features.out_channels
        self.heads = nn.ModuleList(CrossAttentionHead(c) for _ in range(cfg.heads))
        self.fc = nn.Linear(c, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)
        # class centres sampled from a standard Gaussian, as in the paper
        self.centers = nn.Parameter(torch.randn(num_classes, c))

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          align_corners=False)
        fmap = self.features(x)
        heads = torch.stack([h(fmap) for h in self.heads], dim=1)     # [B, k, C]
        if heads.shape[1] > 1:
            heads = torch.log_softmax(heads, dim=1)
        logits = self.bn(self.fc(heads.sum(dim=1)))
        return logits, fmap.mean(dim=(2, 3)), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, K]``."""
        if x.dim() != 4:
            raise ValueError(f"DAN expects [B, 3, H, W], got shape {tuple(x.shape)}")
        return self._run(x)[0]

    def forward_branches(self, xs: torch.Tensor) -> BranchOutput:
        """``[1, B, 3, H, W]`` -> outputs for the family's loss (see the class doc)."""
        if xs.dim() != 5 or xs.shape[0] != 1:
            raise ValueError(f"DAN expects [1, B, 3, H, W], got shape {tuple(xs.shape)}")
        logits, feat, heads = self._run(xs[0])
        # the centres travel with the outputs so that DDP sees them used in forward
        return BranchOutput(logits[None], features=feat,
                            extras={"heads": heads, "centers": self.centers})
