"""PCD, product-cross dual attention (``docs/models.md``), as a trainer family: one
definition parameterised by the ``[pcd]`` config section (:class:`qcs.families.pcd.PCDConfig`).

Image features: the trainer's IR50 (stages 1-3), its last map ``f_img [B, C_img, h, h]``
(paper: 256 x 14 x 14 at 112 px). Landmark features ``f_lm [B, C_lm, h, h]`` come from a
pluggable source (``model.landmarks``):

- ``heatmap``: landmark heat-maps stored beside the images (the built-in data writes them,
  see :mod:`qcs.data.landmarks`), fed as channels 3.. of the input
  (``x [B, 3 + L, H, W]``) and max-pooled to ``h x h``; no parameters.
- ``mobilefacenet``: a MobileFaceNet-style landmark backbone (:class:`LandmarkNet`) that is
  frozen; its weights come from ``pcd.landmark_weights`` (loaded by the family; none by
  default: random and frozen, which only makes sense for tests).

Then: dot-product attention ``f_fusion = f_img * max_c(f_lm)`` (the channel max repeated over
the image channels), tokens of both (``h*h`` each plus a class token), ``vit_depth``
cross-feature blocks (landmark tokens give the queries, fusion tokens the keys and values)
and a linear head on the fusion class token, which is also the feature of the NeAA loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .ir50 import IR50
from .outputs import BranchOutput

if TYPE_CHECKING:
    from ..families.pcd import PCDConfig

__all__ = ["PCD", "CrossFeatureBlock", "LandmarkNet"]


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(_conv_bn(cin, mid, 1, 1), _conv_bn(mid, mid, 3, stride, mid),
                                  _conv_bn(mid, cout, 1, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class LandmarkNet(nn.Module):
    """MobileFaceNet-style trunk: ``[B, 3, S, S] -> [B, widths[2], S/8, S/8]`` (conv s2,
    depthwise conv, then two stages of inverted residual units, each opening with stride 2).
    Frozen: no gradients, always in eval mode (its BN statistics stay those of its weights).
    """

    def __init__(self, widths=(64, 64, 128), depths=(2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, widths[0], 3, 2),
                                  _conv_bn(widths[0], widths[0], 3, 1, widths[0]))
        stages, cin = [], widths[0]
        for w, n in zip(widths[1:], depths):
            stages += [_InvertedResidual(cin, w, 2)] + [_InvertedResidual(w, w, 1)
                                                        for _ in range(n - 1)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> LandmarkNet:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class CrossFeatureBlock(nn.Module):
    """Pre-norm block: ``(t_lm [B, T, D], t_fusion [B, T, D]) -> t_fusion' [B, T, D]``:
    attention with queries from the landmark tokens and keys/values from the fusion tokens,
    then an MLP, both residual on the fusion tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float,
                 attn_drop: float) -> None:
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.norm_lm = nn.LayerNorm(dim, eps=1e-6)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q_lm = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop),
                                 nn.Linear(hidden, dim), nn.Dropout(drop))

    def forward(self, t_lm: torch.Tensor, t_fus: torch.Tensor) -> torch.Tensor:
        b, t, c = t_fus.shape
        h = self.heads
        q = self.q_lm(self.norm_lm(t_lm)).view(b, t, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm1(t_fus)).view(b, t, 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        t_fus = t_fus + self.drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))
        return t_fus + self.mlp(self.norm2(t_fus))


class PCD(nn.Module):
    """PCD as a trainer variant.

    ``model(x)``: ``x [B, 3, H, W]`` (``mobilefacenet``) or ``[B, 3 + L, H, W]`` (image and
    ``L`` heat-map channels, ``heatmap``) -> logits ``[B, K]``.
    ``model.forward_branches(xs [1, B, C, H, W])`` -> a :class:`BranchOutput` with
    ``logits [1, B, K]`` and ``features [B, D]`` (the fusion class token); the family's
    loss is ``CE + neaa_weight * NeAA``.
    """

    def __init__(self, cfg: PCDConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        if cfg.landmarks not in ("heatmap", "mobilefacenet"):
            raise ValueError(f"pcd.landmarks must be heatmap or mobilefacenet, got "
                             f"{cfg.landmarks!r}")
        self.num_classes = num_classes
        self.landmarks = cfg.landmarks
        self.size = cfg.backbone_size
        self.side = cfg.backbone_size // 8          # the IR50 stage-3 map (14 at 112 px)
        self.ir_back = IR50(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_size,
                            cfg.backbone_resize)
        self.landmark_net: LandmarkNet | None = None
        if cfg.landmarks == "mobilefacenet":
            self.landmark_net = LandmarkNet(cfg.landmark_widths)
            c_lm = self.landmark_net.out_channels
        else:
            c_lm = cfg.heatmap_channels
        d, tokens = cfg.embed_dim, self.side ** 2
        self.embed_img = nn.Linear(cfg.backbone_widths[-1], d)
        self.embed_lm = nn.Linear(c_lm, d)
        self.cls_img = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_lm = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, d))
        self.blocks = nn.ModuleList(
            CrossFeatureBlock(d, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_dropout)
            for _ in range(cfg.vit_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)
        for p in (self.cls_img, self.cls_lm, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def landmark_features(self, x: torch.Tensor) -> torch.Tensor:
        """``f_lm [B, C_lm, h, h]`` from the input (see the class doc for ``x``)."""
        if self.landmark_net is not None:
            img = F.interpolate(x[:, :3], size=(self.size, self.size), mode="bilinear",
                                align_corners=False)
            with torch.no_grad():
                return self.landmark_net(img)
        if x.shape[1] <= 3:
            raise ValueError("this PCD network reads landmark heat-maps (pcd.landmarks = "
                             "'heatmap'): the input needs [B, 3 + L, H, W] with the maps "
                             "after the image channels, got shape " f"{tuple(x.shape)}")
        return F.adaptive_max_pool2d(x[:, 3:], self.side)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_lm = self.landmark_features(x)
        f_img = self.ir_back(x[:, :3])[-1]
        # dot-product attention: the landmark map's channel max, broadcast over channels
        f_fus = f_img * f_lm.amax(dim=1, keepdim=True)
        b = x.shape[0]
        t_fus = torch.cat([self.cls_img.expand(b, -1, -1),
                           self.embed_img(f_fus.flatten(2).transpose(1, 2))], 1) + self.pos_embed
        t_lm = torch.cat([self.cls_lm.expand(b, -1, -1),
                          self.embed_lm(f_lm.flatten(2).transpose(1, 2))], 1) + self.pos_embed
        for blk in self.blocks:
            t_fus = blk(t_lm, t_fus)
        feat = self.norm(t_fus)[:, 0]
        return self.head(feat), feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, K]``."""
        if x.dim() != 4:
            raise ValueError(f"PCD expects [B, C, H, W], got shape {tuple(x.shape)}")
        return self._run(x)[0]

    def forward_branches(self, xs: torch.Tensor) -> BranchOutput:
        """``[1, B, C, H, W]`` -> ``logits [1, B, K]``, ``features [B, D]``."""
        if xs.dim() != 5 or xs.shape[0] != 1:
            raise ValueError(f"PCD expects [1, B, C, H, W], got shape {tuple(xs.shape)}")
        logits, feat = self._run(xs[0])
        return BranchOutput(logits[None], features=feat)
