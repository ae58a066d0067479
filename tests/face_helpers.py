"""Helpers of the face tests: drawn faces whose five landmarks are known exactly, placed
on a canvas by a known similarity transform, and scikit-image's sample photographs."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def drawn_face(size: int = 100, skin: int = 205, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A grey frontal face (``size`` wide, ``1.3 * size`` high) drawn at four times the
    size and reduced, and its five landmarks ``[5, 2]`` in its pixels (continuous
    coordinates, pixel ``i`` spans ``[i, i + 1]``): pupil centres, the nose tip (the
    bottom of the nose shadow, above the nostrils) and the outer ends of the mouth."""
    rng = np.random.default_rng(seed)
    k = 4
    s = size * k
    im = Image.new("L", (s, int(s * 1.3)), 95)
    d = ImageDraw.Draw(im)
    cx, cy, fw, fh = s / 2, s * 0.65, 0.42 * s, 0.55 * s
    ex, ey = 0.38 * fw * rng.uniform(0.95, 1.05), cy - 0.12 * fh
    ny, my, mw = cy + 0.2 * fh, cy + 0.45 * fh, 0.3 * fw * rng.uniform(0.9, 1.1)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw, cy - fh, cx + fw, cy + fh * 0.2], 180, 360, fill=55)      # hair
    d.ellipse([cx - fw * 0.92, cy - fh * 0.62, cx + fw * 0.92, cy + fh * 0.95], fill=skin)
    for side in (-1, 1):
        x = cx + side * ex
        d.ellipse([x - 0.2 * fw, ey - 0.07 * fh, x + 0.2 * fw, ey + 0.07 * fh], fill=skin - 125)
        d.ellipse([x - 0.08 * fw, ey - 0.05 * fh, x + 0.08 * fw, ey + 0.05 * fh], fill=20)
        d.line([(x - 0.25 * fw, ey - 0.18 * fh), (x + 0.2 * fw, ey - 0.2 * fh)],
               fill=skin - 140, width=s // 25)                                   # brow
    d.polygon([(cx - 0.1 * fw, ny), (cx + 0.1 * fw, ny), (cx, cy + 0.02 * fh)],
              fill=skin - 55)                                                    # nose
    for side in (-1, 1):
        x = cx + side * 0.05 * fw
        d.ellipse([x - 0.03 * fw, ny - 0.01 * fh, x + 0.03 * fw, ny + 0.03 * fh], fill=60)
    d.ellipse([cx - mw, my - 0.06 * fh, cx + mw, my + 0.06 * fh], fill=skin - 120)  # mouth
    pts = np.array([[cx - ex, ey], [cx + ex, ey], [cx, ny - 0.03 * fh],
                    [cx - mw, my], [cx + mw, my]]) / k
    small = im.resize((size, int(size * 1.3)), Image.LANCZOS)
    return small.filter(ImageFilter.GaussianBlur(size / 80)).convert("RGB"), pts


def similarity(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """``2x3`` matrix: rotate by ``angle`` degrees (counter-clockwise on screen), scale,
    then shift."""
    t = math.radians(angle)
    a = scale * np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return np.concatenate([a, np.asarray(shift, dtype=np.float64)[:, None]], axis=1)


def place(face: Image.Image, points: np.ndarray, m: np.ndarray, canvas: tuple[int, int],
          background: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """``face`` warped onto a ``canvas`` (w, h) by ``m`` (face pixels -> canvas pixels),
    and ``points`` mapped the same way. The margin around the face is filled with
    ``background`` by first framing the face in it."""
    pad = face.width
    framed = Image.new("RGB", (face.width + 2 * pad, face.height + 2 * pad), (background,) * 3)
    framed.paste(face, (pad, pad))
    shift = np.array([[1, 0, -pad], [0, 1, -pad]], dtype=np.float64)  # framed -> face
    full = m[:, :2] @ shift[:, :2]
    full = np.concatenate([full, (m[:, :2] @ shift[:, 2] + m[:, 2])[:, None]], axis=1)
    inv_a = np.linalg.inv(full[:, :2])
    inv = np.concatenate([inv_a, (-inv_a @ full[:, 2])[:, None]], axis=1)
    out = framed.transform(canvas, Image.AFFINE, data=tuple(inv.ravel()),
                           resample=Image.BICUBIC, fillcolor=(background,) * 3)
    return np.asarray(out), points @ m[:, :2].T + m[:, 2]


def photos() -> dict[str, np.ndarray]:
    """scikit-image's sample photographs used by the tests: the astronaut portrait, a cup
    of coffee and a cat (``uint8 [H, W, 3]``)."""
    import skimage.data
    return {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
            "cat": skimage.data.chelsea()}
