"""Five landmarks for the images of a real dataset, and PCD's heat maps drawn from them.

Sources:

- RAF-DB's manual annotations, ``basic/Annotation/manual/NAME_manu_attri.txt``: five
  ``x y`` lines (eyes, nose tip, mouth corners) in the pixels of ``Image/original/NAME``,
  then gender, race and age. The ``aligned`` images were made from them by a similarity
  transform onto a fixed template, so the same fit onto the template (the default one, or
  one measured on the aligned images by the detector) carries them into the aligned image.
- AffectNet's ``facial_landmarks`` column (68 points, ``x;y;x;y;...``), reduced to five:
  the centres of the two eye contours, the nose tip (point 31 of 68) and the mouth corners
  (49 and 55).
- The detector, on any folder of images (the best face of each image).

Maps are written where the trainer reads them (:func:`qcs.data.landmarks.heatmap_path`:
``DIR/landmarks/STEM.png``), as the built-in data's are.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..atomic import atomic_write
from ..data.landmarks import heatmap_path, render_heatmaps
from .align import TEMPLATES, apply_transform, estimate_template, umeyama
from .maps import pcd_points

__all__ = [
    "detect_points",
    "five_from_68",
    "landmark_items",
    "measure_template",
    "raf_aligned_points",
    "read_affectnet_points",
    "read_raf_manual",
    "write_landmark_maps",
]

MAX_MAP_SIDE = 256


def _five(values: list[float], where: str) -> np.ndarray:
    if len(values) < 10:
        raise ValueError(f"{where}: expected five 'x y' landmark lines, got {len(values)} numbers")
    return np.asarray(values[:10], dtype=np.float64).reshape(5, 2)


def read_raf_manual(root: str | Path) -> dict[str, np.ndarray]:
    """RAF-DB's manual five points by image stem (``train_00001``), in the pixels of the
    original image. ``root`` is the ``basic`` directory or its parent."""
    root = Path(root)
    base = root / "basic" if (root / "basic" / "Annotation").is_dir() else root
    folder = base / "Annotation" / "manual"
    if not folder.is_dir():
        raise FileNotFoundError(f"RAF-DB manual landmarks not found: {folder} (expected "
                                "NAME_manu_attri.txt files)")
    out = {}
    for path in sorted(folder.glob("*_manu_attri.txt")):
        lines = path.read_text(errors="replace").split("\n")[:5]
        try:
            nums = [float(v) for line in lines for v in line.split()]
        except ValueError:
            raise ValueError(f"{path}: the first five lines must be 'x y' numbers") from None
        out[path.name[:-len("_manu_attri.txt")]] = _five(nums, str(path))
    if not out:
        raise FileNotFoundError(f"{folder} has no NAME_manu_attri.txt files")
    return out


def raf_aligned_points(points, size: float, template: np.ndarray | None = None) -> np.ndarray:
    """Where the original-image ``points`` land in a ``size``-pixel aligned image made by
    the five-point similarity fit onto ``template`` (fractions; default RAF-DB's)."""
    tpl = (TEMPLATES["raf-db"] if template is None else np.asarray(template)) * size
    return apply_transform(umeyama(points, tpl), points)


def five_from_68(points) -> np.ndarray:
    """The five points of a 68-point (iBUG 300-W) layout: the mean of each eye contour
    (37-42, 43-48 in 1-based numbering), the nose tip (31), the mouth corners (49, 55)."""
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected 68 [x, y] landmarks, got shape {list(p.shape)}")
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def read_affectnet_points(list_file: str | Path) -> dict[str, np.ndarray]:
    """AffectNet's list CSV -> five points per ``subDirectory_filePath``."""
    list_file = Path(list_file)
    out = {}
    with list_file.open(newline="", errors="replace") as fh:
        reader = csv.DictReader(fh)
        if "facial_landmarks" not in (reader.fieldnames or []):
            raise ValueError(f"{list_file}: no 'facial_landmarks' column (the official "
                             "training.csv / validation.csv have one)")
        for row in reader:
            text = (row.get("facial_landmarks") or "").strip()
            if not text:
                continue
            try:
                vals = [float(v) for v in text.split(";") if v.strip()]
            except ValueError:
                raise ValueError(f"{list_file}:{reader.line_num}: facial_landmarks is not "
                                 "';'-separated numbers") from None
            if len(vals) != 136:
                raise ValueError(f"{list_file}:{reader.line_num}: expected 68 landmarks "
                                 f"(136 numbers), got {len(vals)}")
            out[row["subDirectory_filePath"]] = five_from_68(np.reshape(vals, (68, 2)))
    return out


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def detect_points(paths: Iterable[Path], detector, batch: int = 16
                  ) -> Iterator[tuple[Path, np.ndarray | None]]:
    """``(path, five points of the best face or None)`` for each image, ``batch`` images
    per detector call; unreadable images give ``None``."""
    paths = list(paths)
    for i in range(0, len(paths), batch):
        chunk, imgs = [], []
        for p in paths[i:i + batch]:
            try:
                imgs.append(_read_rgb(p))
                chunk.append(p)
            except (OSError, ValueError):
                yield p, None
        for p, faces in zip(chunk, detector.detect(imgs)):
            yield p, (faces[0].landmarks if faces and faces[0].landmarks is not None else None)


def measure_template(aligned: Iterable[Path], detector, size: float, limit: int = 200
                     ) -> np.ndarray | None:
    """The template of a set of already aligned ``size``-pixel images, measured with the
    detector on up to ``limit`` of them; ``None`` when it finds fewer than 10 faces."""
    paths = list(aligned)[:limit]
    found = [pts for _, pts in detect_points(paths, detector) if pts is not None]
    return estimate_template(found, size) if len(found) >= 10 else None


def _save_png(picture: Image.Image, path: Path) -> None:
    picture.save(path, format="PNG")


def write_landmark_maps(items: Iterable[tuple[Path, np.ndarray | None]], overwrite: bool = False,
                        progress: Callable[[int, int], None] | None = None
                        ) -> tuple[int, list[Path]]:
    """Draw the eye / mouth maps of each ``(image, five points in its pixels)`` beside it.

    Returns ``(written, missing)``: how many maps were written, and the images without
    points. Each map is written under a temporary name and renamed."""
    items = list(items)
    written, missing = 0, []
    for k, (path, pts) in enumerate(items):
        dest = heatmap_path(path)
        if pts is None:
            missing.append(path)
        elif overwrite or not dest.exists():
            with Image.open(path) as im:
                w, h = ImageOps.exif_transpose(im).size
            side = min(MAX_MAP_SIDE, max(w, h))
            frac = np.asarray(pts, dtype=np.float64) / [w, h]
            maps = render_heatmaps(pcd_points(frac, 1.0), side)
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, partial(_save_png, Image.fromarray(maps)), durable=False)
            written += 1
        if progress is not None:
            progress(k + 1, len(items))
    return written, missing


def _raf_items(paths: list[Path], root: Path, detector) -> Iterator[tuple[Path, np.ndarray | None]]:
    manual = read_raf_manual(root)
    aligned = [p for p in paths if p.parent.name == "aligned"]
    template = None
    if aligned and detector is not None:
        with Image.open(aligned[0]) as im:
            side = im.width
        template = measure_template(aligned, detector, side)
    for p in paths:
        stem = p.stem.removesuffix("_aligned")
        pts = manual.get(stem)
        if pts is not None and p.parent.name == "aligned":
            with Image.open(p) as im:
                pts = raf_aligned_points(pts, im.width, template)
        yield p, pts


def landmark_items(paths: Iterable[Path], source: str, root: str | Path = "", detector=None,
                   list_file: str | Path = "") -> Iterator[tuple[Path, np.ndarray | None]]:
    """``(image, five points in its pixels or None)`` for each of ``paths``.

    ``source``: ``raf-manual`` (``root`` is RAF-DB's; with a ``detector`` the aligned
    images' template is measured rather than assumed), ``affectnet`` (``list_file``, the
    CSV with the ``facial_landmarks`` column; images named relative to
    ``root/Manually_Annotated_Images``) or ``detect`` (``detector`` on every image)."""
    paths = [Path(p) for p in paths]
    if source == "raf-manual":
        yield from _raf_items(paths, Path(root), detector)
    elif source == "affectnet":
        points = read_affectnet_points(list_file)
        base = Path(root) / "Manually_Annotated_Images"
        for p in paths:
            key = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name
            yield p, points.get(key)
    elif source == "detect":
        if detector is None:
            raise ValueError("source 'detect' needs a detector")
        yield from detect_points(paths, detector)
    else:
        raise ValueError(f"source must be raf-manual, affectnet or detect, got {source!r}")
