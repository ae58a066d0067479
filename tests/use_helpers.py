"""Helpers of the predict / visualize / export / DDP tests: an untrained micro checkpoint
(seeded; no training needed to test the plumbing) and a drawn face that OpenCV's Haar
cascade detects."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]


# A micro network with the real structure (three token levels of 4x4, ViT_base, cross
# modules, ViT_cross) on 32 px images; kept here so these tests stand on their own.
MICRO_SET = [
    "qcs.backbone_depths=[1, 1, 1]", "qcs.backbone_widths=[8, 8, 16]",
    "qcs.backbone_size=32", "qcs.tokens_side=4", "qcs.embed_dim=16", "qcs.heads=2",
    "qcs.vit_depth=1", "qcs.mlp_ratio=2.0", "data.image_size=32", "data.synth_size=32",
    "data.cache_in_memory=true", "optim.lr=3e-3", "train.batch_size=16", "train.threads=1",
]


def micro_config(variant: str = "qcs", scope: str = "batch", extra: list[str] | None = None):
    from qcs.config import apply_overrides, load_config
    return apply_overrides(load_config("tiny"), MICRO_SET + [
        f"qcs.variant={variant}", "model.num_classes=7", f"qcs.csa_scope={scope}",
        "qcs.backend=reference"] + (extra or []))


def make_checkpoint(directory: Path, variant: str = "qcs", scope: str = "batch",
                    seed: int = 0, data_root: str = "") -> Path:
    """Write ``directory/best.*`` for a freshly initialised micro network (seeded).
    Returns the checkpoint base ``directory/best``."""
    from qcs.checkpoint import save_checkpoint
    from qcs.families import build_model
    cfg = micro_config(variant, scope)
    torch.manual_seed(seed)
    model = build_model(cfg)
    base = Path(directory) / "best"
    save_checkpoint(base, model, {"config": cfg.to_dict(), "classes": CLASSES, "epoch": 1,
                                  "data_root": data_root})
    return base


def draw_face(size: int, skin: int = 210, background: int = 90) -> Image.Image:
    """A grey frontal face ``size`` wide, ``1.3 * size`` high: the light/dark layout a Haar
    cascade keys on (dark eye band over lighter cheeks, a lighter nose bridge, a dark
    mouth, hair), slightly blurred. The procedural faces of the built-in data are
    detected only part of the time, so detection is tested on this one."""
    s = size
    im = Image.new("L", (s, int(s * 1.3)), background)
    d = ImageDraw.Draw(im)
    cx, cy, fw, fh = s / 2, s * 0.65, 0.42 * s, 0.55 * s
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw, cy - fh, cx + fw, cy + fh * 0.2], 180, 360, fill=60)     # hair
    d.ellipse([cx - fw * 0.92, cy - fh * 0.62, cx + fw * 0.92, cy + fh * 0.95], fill=skin)
    ey = cy - 0.12 * fh
    for side in (-1, 1):
        x = cx + side * 0.38 * fw
        d.ellipse([x - 0.2 * fw, ey - 0.07 * fh, x + 0.2 * fw, ey + 0.07 * fh],
                  fill=skin - 130)                                              # eye socket
        d.ellipse([x - 0.08 * fw, ey - 0.05 * fh, x + 0.08 * fw, ey + 0.05 * fh], fill=20)
        d.line([(x - 0.25 * fw, ey - 0.18 * fh), (x + 0.2 * fw, ey - 0.2 * fh)],
               fill=skin - 140, width=max(2, s // 25))                          # brow
    d.polygon([(cx - 0.1 * fw, cy + 0.2 * fh), (cx + 0.1 * fw, cy + 0.2 * fh),
               (cx, cy + 0.05 * fh)], fill=skin - 60)                           # nose
    my = cy + 0.45 * fh
    d.ellipse([cx - 0.3 * fw, my - 0.06 * fh, cx + 0.3 * fw, my + 0.06 * fh], fill=skin - 120)
    return im.filter(ImageFilter.GaussianBlur(s / 60))


def face_centre(size: int, at: tuple[int, int]) -> tuple[float, float]:
    """Centre (between the eyes and the mouth) of ``draw_face(size)`` pasted at ``at``."""
    return at[0] + size / 2, at[1] + size * 0.65 + 0.1 * 0.55 * size
