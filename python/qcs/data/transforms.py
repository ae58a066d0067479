"""The paper's image transforms (torchvision.transforms.v2) on ``uint8 [3, S, S]`` tensors.

The published training scripts differ per dataset; every difference is a parameter here:

- ``resize``: the images are first resized to ``resize x resize`` (aspect ratio not kept,
  as ``Resize((r, r))`` in the scripts); when ``resize`` is larger than ``size`` a random
  ``size`` crop is taken for training and the centre crop for testing (FERPlus:
  232 / 234, AffectNet: 236). ``0`` resizes straight to ``size`` (RAF-DB).
- ``rotation``: ``RandomRotation(degrees)`` after the flip (0: none).
- ``color_jitter``: ``ColorJitter(0.2, 0.2, 0.2, 0.1)`` (off in one script).
- ``erasing``: the ``RandomErasing`` area range (AffectNet: 0.03-0.1, else 0.02-0.1).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "test_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check(size: int, resize: int, rotation: float, erasing: tuple[float, float]) -> None:
    if resize and resize < size:
        raise ValueError(f"resize must be 0 or >= the image size {size}, got {resize}")
    if rotation < 0:
        raise ValueError(f"rotation must be >= 0 degrees, got {rotation}")
    lo, hi = erasing
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"erasing must be an area range 0 <= lo <= hi <= 1, got {erasing}")


def train_transform(size: int, *, resize: int = 0, rotation: float = 0.0,
                    color_jitter: bool = True, erasing: tuple[float, float] = (0.02, 0.1)
                    ) -> v2.Compose:
    """Resize (and random crop), flip, rotation, colour jitter, normalise, random erasing:
    ``uint8 [3, H, W] -> float32 [3, size, size]`` (see the module docstring)."""
    _check(size, resize, rotation, erasing)
    steps: list = [v2.Resize((resize or size,) * 2, antialias=True), v2.RandomHorizontalFlip()]
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    if resize > size:
        steps.append(v2.RandomCrop((size, size)))
    if color_jitter:
        steps.append(v2.ColorJitter(0.2, 0.2, 0.2, 0.1))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing[1] > 0:
        steps.append(v2.RandomErasing(scale=tuple(erasing)))
    return v2.Compose(steps)


def test_transform(size: int, *, resize: int = 0) -> v2.Compose:
    """Resize (and centre crop when ``resize > size``), normalise:
    ``uint8 [3, H, W] -> float32 [3, size, size]``."""
    _check(size, resize, 0.0, (0.0, 0.0))
    steps: list = [v2.Resize((resize or size,) * 2, antialias=True)]
    if resize > size:
        steps.append(v2.CenterCrop((size, size)))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
