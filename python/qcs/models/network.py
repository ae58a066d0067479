"""The QCS / DCS / baseline network (``docs/models.md``): one definition, parameterised by
the ``[qcs]`` config section (:class:`qcs.families.qcs.QCSConfig`) and the class count.

Shapes: ``R`` branches (4 QCS, 2 DCS, 1 baseline), ``B`` batch, ``K`` classes,
``D`` embedding width, ``T = 3 * side^2`` patch tokens (147 in the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qcs_ext.nn import CrossSimilarity, PairSimilarity

from .ir50 import IR50
from .outputs import BranchOutput
from .variants import BRANCHES

if TYPE_CHECKING:
    from ..families.qcs import QCSConfig

__all__ = ["BRANCHES", "QCSNet", "count_parameters"]



class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-norm transformer block ``[B, T, D] -> [B, T, D]`` (LayerNorm eps 1e-6); ``drop``
    in the MLP, ``proj_drop`` after the attention's output projection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop),
                                 nn.Linear(hidden, dim), nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Class token + learned positions + blocks + LayerNorm, then an SE gate and a linear
    head on the class token.

    ``forward(tokens [B, T, D]) -> (logits [B, K], patch tokens [B, T, D])``.
    """

    def __init__(self, dim: int, tokens: int, depth: int, heads: int, mlp_ratio: float,
                 drop: float, attn_drop: float, num_classes: int, proj_drop: bool = True) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, drop, attn_drop,
                                            drop if proj_drop else 0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.se = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Sigmoid())
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))
        cls = x[:, 0]
        return self.head(cls * self.se(cls)), x[:, 1:]


class LevelEmbed(nn.Module):
    """``[B, C, S, S] -> [B, side^2, D]``: the per-level stride-2 conv, then stride-2 3x3 convs
    down to ``side`` (a 1x1 conv when already there). At the paper geometry (56/28/14 px
    maps, side 7) this is 3x3 s2 + (two s2 | one s2 | 1x1), as in the spec."""

    def __init__(self, channels: int, size: int, dim: int, side: int) -> None:
        super().__init__()
        stride = 2 if size // 2 >= side else 1  # never shrink below the token grid
        self.down = nn.Conv2d(channels, channels, 3, stride, 1)
        size = (size + 1) // 2 if stride == 2 else size
        layers: list[nn.Module] = []
        in_ch = channels
        while size > side:
            layers.append(nn.Conv2d(in_ch, dim, 3, 2, 1))
            in_ch, size = dim, (size + 1) // 2
        if not layers:
            layers.append(nn.Conv2d(channels, dim, 1))
        if size != side:
            raise ValueError(f"a {channels}-channel level cannot be embedded to {side}x{side} "
                             f"tokens (reaches {size}x{size}); adjust model.backbone_size")
        self.embed = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.down(x)).flatten(2).transpose(1, 2)


class QCSNet(nn.Module):
    """The QCS (4 branches), DCS (2) or baseline network.

    ``model(x)`` with ``x: [B, 3, H, W]`` runs the base network only and returns logits
    ``[B, K]`` (inference: the cross branch is never touched).
    ``model.forward_branches(xs)`` with ``xs: [R, B, 3, H, W]`` returns a
    :class:`BranchOutput` with base ``logits [R, B, K]`` and ``cross`` logits ``[R, B, K]``
    (``None`` for the baseline).

    No weights are loaded here; see :func:`qcs.models.load_backbone_weights`.
    """

    def __init__(self, cfg: QCSConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        if cfg.variant not in BRANCHES:
            raise ValueError(f"qcs.variant must be one of {tuple(BRANCHES)}, got {cfg.variant!r}")
        self.variant, self.num_classes = cfg.variant, num_classes
        self.branches = BRANCHES[cfg.variant]
        d, side = cfg.embed_dim, cfg.tokens_side
        self.tokens_per_level = side * side
        self.ir_back = IR50(cfg.backbone_depths, cfg.backbone_widths, cfg.backbone_size,
                            cfg.backbone_resize)
        sizes = [cfg.backbone_size // 2 ** (i + 1) for i in range(3)]
        self.embeds = nn.ModuleList(
            LevelEmbed(w, s, d, side) for w, s in zip(cfg.backbone_widths, sizes))
        tokens = 3 * self.tokens_per_level
        vit = dict(dim=d, tokens=tokens, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                   attn_drop=cfg.attn_dropout, num_classes=num_classes,
                   proj_drop=cfg.attn_proj_dropout)
        self.vit_base = ViT(depth=cfg.vit_depth, drop=cfg.dropout, **vit)
        self.cross: nn.ModuleList | None = None
        self.vit_cross: ViT | None = None
        if cfg.variant != "baseline":
            self.cross = nn.ModuleList(_cross_module(cfg, d) for _ in range(3))  # per level
            self.vit_cross = ViT(depth=cfg.vit_cross_depth,
                                 drop=_or_dropout(cfg.vit_cross_dropout, cfg), **vit)
        self.apply(_init_linear)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, T, D]``: backbone maps embedded and concatenated."""
        return torch.cat([emb(f) for emb, f in zip(self.embeds, self.ir_back(x))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base network only: ``[B, 3, H, W] -> [B, K]``."""
        if x.dim() != 4:
            raise ValueError(f"model(x) expects [B, 3, H, W], got shape {tuple(x.shape)}; "
                             "use forward_branches for [R, B, 3, H, W]")
        return self.vit_base(self.tokens(x))[0]

    def forward_branches(self, xs: torch.Tensor) -> BranchOutput:
        """``[R, B, 3, H, W] ->`` base ``logits [R, B, K]``, ``cross [R, B, K]`` or None."""
        if xs.dim() != 5 or xs.shape[0] != self.branches:
            raise ValueError(f"the {self.variant} network expects [{self.branches}, B, 3, H, W], "
                             f"got shape {tuple(xs.shape)}")
        r, b = xs.shape[:2]
        base, t = self.vit_base(self.tokens(xs.flatten(0, 1)))
        base = base.view(r, b, -1)
        if self.cross is None:
            return BranchOutput(base)
        t = t.view(r, b, *t.shape[1:])
        n = self.tokens_per_level
        # each level's tokens go through that level's cross module, all branches at once
        x = torch.cat([m(t[:, :, i * n:(i + 1) * n]) for i, m in enumerate(self.cross)], dim=2)
        cross, _ = self.vit_cross((t + x).flatten(0, 1))  # contrastive residual distillation
        return BranchOutput(base, cross.view(r, b, -1))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights inference needs (no ``cross.*`` / ``vit_cross.*``)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("cross.", "vit_cross."))}


def _cross_module(cfg: QCSConfig, dim: int) -> nn.Module:
    """One level's cross module: CSA over quadruplets (QCS) or pairs (DCS)."""
    common = dict(scope=cfg.csa_scope, backend=cfg.backend, mlp_ratio=cfg.mlp_ratio,
                  dropout=_or_dropout(cfg.cross_mlp_dropout, cfg), residual=cfg.cross_residual)
    if cfg.variant == "qcs":
        return CrossSimilarity(dim, gamma=cfg.csa_gamma, mode=cfg.csa_mode, **common)
    return PairSimilarity(dim, **common)


def _or_dropout(value: float, cfg: QCSConfig) -> float:
    """A per-module dropout field: negative means ``qcs.dropout``."""
    return cfg.dropout if value < 0 else value


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


