"""The paper's image transforms (torchvision.transforms.v2) on ``uint8 [3, S, S]`` tensors."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "test_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int) -> v2.Compose:
    """Resize, flip, ColorJitter(0.2, 0.2, 0.2, 0.1), normalise, RandomErasing(0.02-0.1):
    ``uint8 [3, H, W] -> float32 [3, size, size]``."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.2, 0.2, 0.2, 0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(scale=(0.02, 0.1)),
    ])


def test_transform(size: int) -> v2.Compose:
    """Resize and normalise: ``uint8 [3, H, W] -> float32 [3, size, size]``."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
