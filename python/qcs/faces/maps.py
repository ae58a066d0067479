"""Five landmarks -> the eye and mouth heat maps PCD reads (``pcd.landmarks =
"heatmap"``), drawn exactly as the built-in data's maps (:mod:`qcs.data.landmarks`)."""

from __future__ import annotations

import numpy as np

from ..data.landmarks import render_heatmaps

__all__ = ["landmark_heatmaps", "pcd_points"]


def pcd_points(landmarks, size: float) -> list[tuple[float, float]]:
    """The three points PCD's maps mark, as fractions of a ``size``-pixel square: the left
    eye, the right eye and the mouth centre (the mean of the two mouth corners), from five
    landmarks ``[5, 2]`` in that square's pixels."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must be [5, 2] (eyes, nose, mouth corners), got "
                         f"{list(pts.shape)}")
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    mouth = (pts[3] + pts[4]) / 2
    return [tuple(float(v) / size for v in p) for p in (pts[0], pts[1], mouth)]


def landmark_heatmaps(landmarks, size: int, sigma: float = 0.06) -> np.ndarray:
    """``uint8 [size, size, 3]`` maps (left eye, right eye, mouth) for a ``size x size``
    crop whose five landmarks are ``landmarks`` (crop pixels)."""
    return render_heatmaps(pcd_points(landmarks, size), size, sigma)
