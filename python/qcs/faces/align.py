"""Alignment: warp a face so that its five landmarks land on a dataset's template.

The warp is the least-squares similarity transform (rotation, uniform scale, translation)
of the five detected points onto the template's (Umeyama, "Least-squares estimation of
transformation parameters between two point patterns", 1991), so a face cropped at
prediction time is laid out like the faces a network was trained on.

Templates are five ``[x, y]`` points as fractions of the square crop's side, in the order
left eye, right eye, nose tip, left mouth corner, right mouth corner:

- ``raf-db``: RAF-DB's 100x100 ``aligned`` images, which the dataset made by a
  similarity transform of its five manual landmarks. The template itself is not
  published; ours places the eyes at 41% of the height, 30% of the side apart, with the
  nose and mouth at a human face's proportions to the eye distance (the built-in data is
  drawn at nearly the same places). :func:`estimate_template` measures it from a copy of
  the dataset's aligned images.
- ``box``: FERPlus (FER2013's 48x48 crops) and AffectNet (its face-box crops) are not
  landmark-aligned but cut around a detected face box; this template is where MTCNN puts
  the five points inside its own square face box (measured on scikit-image's astronaut
  portrait, upright, mirrored and rotated by +-20 degrees, made left-right symmetric), so
  the warp reproduces a box crop with the eye line levelled.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

__all__ = [
    "LAYOUT_TEMPLATES",
    "TEMPLATES",
    "align_face",
    "apply_transform",
    "estimate_template",
    "template_for",
    "umeyama",
]

TEMPLATES: dict[str, np.ndarray] = {
    "raf-db": np.array([[0.350, 0.410], [0.650, 0.410], [0.500, 0.581],
                        [0.376, 0.758], [0.624, 0.758]]),
    "box": np.array([[0.308, 0.366], [0.692, 0.366], [0.500, 0.598],
                     [0.304, 0.703], [0.696, 0.703]]),
}

# which template the crops of each data layout (``data.format``) resemble
LAYOUT_TEMPLATES = {"raf-db": "raf-db", "synth": "raf-db", "ferplus": "box",
                    "affectnet7": "box", "affectnet8": "box", "folder": "raf-db"}


def template_for(name: str) -> np.ndarray:
    """The template called ``name`` (a key of :data:`TEMPLATES` or a data layout)."""
    key = LAYOUT_TEMPLATES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)} or a data layout "
                         f"{sorted(LAYOUT_TEMPLATES)}, got {name!r}")
    return TEMPLATES[key]


def _points(a, name: str, least: int = 2) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or len(a) < least:
        raise ValueError(f"{name} must be [N >= {least}, 2] points, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    return a


def umeyama(src, dst) -> np.ndarray:
    """The similarity transform ``T`` (``2x3``) minimising ``sum |T(src_i) - dst_i|^2``;
    ``T(p) = T[:, :2] @ p + T[:, 2]``, a rotation times a uniform scale plus a shift
    (never a reflection)."""
    src, dst = _points(src, "src"), _points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {list(src.shape)} and "
                         f"{list(dst.shape)}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("src points all coincide: no transform is defined")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.concatenate([scale * r, t[:, None]], axis=1)


def apply_transform(m: np.ndarray, points) -> np.ndarray:
    """``points [N, 2]`` mapped by the ``2x3`` affine ``m``."""
    return _points(points, "points", 1) @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def _invert(m: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, (-a @ m[:, 2])[:, None]], axis=1)


def align_face(image: Image.Image, landmarks, size: int, template: str | np.ndarray = "raf-db"
               ) -> tuple[Image.Image, np.ndarray]:
    """The ``size x size`` crop of ``image`` in which ``landmarks`` (``[5, 2]`` pixels)
    best match ``template`` (black outside the image), and the ``2x3`` matrix mapping image
    pixels to crop pixels (apply it to the landmarks for their place in the crop)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    tpl = template_for(template) if isinstance(template, str) else _points(template, "template")
    pts = _points(landmarks, "landmarks")
    if len(pts) != len(tpl):
        raise ValueError(f"landmarks has {len(pts)} points, the template {len(tpl)}")
    # pixel centres: a template fraction f sits at f * size in continuous coordinates
    m = umeyama(pts, tpl * size)
    inv = _invert(m)
    crop = image.transform((size, size), Image.AFFINE, data=tuple(inv.ravel()),
                           resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return crop, m


def estimate_template(landmarks: Iterable, size: float) -> np.ndarray:
    """A template (fractions of the side) from the five points found on many images that
    are already aligned, ``size x size`` pixels each: their mean after discarding faces
    more than 3 median absolute deviations from it."""
    pts = np.stack([_points(p, "landmarks") for p in landmarks]) / float(size)
    if len(pts) == 0:
        raise ValueError("estimate_template needs at least one set of landmarks")
    med = np.median(pts, axis=0)
    dist = np.linalg.norm(pts - med, axis=2).mean(axis=1)
    mad = np.median(np.abs(dist - np.median(dist))) + 1e-9
    keep = dist <= np.median(dist) + 3 * mad
    return pts[keep].mean(axis=0)
