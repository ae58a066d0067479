"""Landmark heat-maps stored beside the images (PCD's ``heatmap`` landmark source).

Layout: the heat-map of ``DIR/NAME.EXT`` is ``DIR/landmarks/NAME.png``, an RGB PNG whose
channels are the left eye, right eye and mouth maps (``uint8``, 255 at a landmark). The
sub-directory keeps them out of every image loader's listing (``folder`` layouts read only
files directly inside a class directory).

The built-in data records where it drew the eyes and mouth (``synth_factors.jsonl``), so
:func:`write_synth_heatmaps` renders the maps of an existing built-in dataset; the images,
label files and the cache tag are untouched (old caches gain the maps on first use).

:class:`HeatmapDataset` returns ``[3 + L, S, S]`` tensors: the normalised image, then the
``L`` maps in ``[0, 1]``; flips are applied to both together, colour changes and erasing to
the image only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..atomic import atomic_write
from .datasets import DataError, ImageDataset, ImageList, TransformedItems
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "HeatmapDataset",
    "HeatmapTransform",
    "ensure_heatmaps",
    "heatmap_path",
    "read_heatmap",
    "render_heatmaps",
    "write_synth_heatmaps",
]

HEATMAP_DIR = "landmarks"


def heatmap_path(image: str | Path) -> Path:
    """Where the heat-map of ``image`` is stored: ``DIR/landmarks/STEM.png``."""
    image = Path(image)
    return image.parent / HEATMAP_DIR / f"{image.stem}.png"


def render_heatmaps(points: list[tuple[float, float]], size: int, sigma: float = 0.06
                    ) -> np.ndarray:
    """One Gaussian blob per point: ``uint8 [size, size, len(points)]``.

    ``points`` are ``(x, y)`` in image fractions (0..1, origin top-left); ``sigma`` is the
    blob's standard deviation as a fraction of the side."""
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size
    maps = []
    for x, y in points:
        gx = np.exp(-((grid - x) ** 2) / (2 * sigma ** 2))
        gy = np.exp(-((grid - y) ** 2) / (2 * sigma ** 2))
        maps.append(np.outer(gy, gx))
    return np.clip(np.rint(np.stack(maps, axis=-1) * 255), 0, 255).astype(np.uint8)


def write_synth_heatmaps(root: str | Path, overwrite: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> int:
    """Render the eye / mouth heat-maps of a built-in dataset at ``root`` (its ``basic``
    directory) from ``synth_factors.jsonl``. Returns how many files were written; each is
    written to a temporary name and renamed, so concurrent or interrupted runs are safe."""
    root = Path(root)
    factors = root / "synth_factors.jsonl"
    if not factors.is_file():
        raise DataError(f"{factors} not found: only the built-in data can draw its heat-maps")
    rows = [json.loads(line) for line in factors.read_text().splitlines() if line.strip()]
    out_dir = root / "Image" / "aligned" / HEATMAP_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    size = json.loads((root / "synth.json").read_text()).get("size", 100)
    written = 0
    for k, row in enumerate(rows):
        stem = Path(row["name"]).stem + "_aligned"
        dest = out_dir / f"{stem}.png"
        if overwrite or not dest.exists():
            pts = [tuple(row["eyes"][0]), tuple(row["eyes"][1]), tuple(row["mouth"])]
            maps = Image.fromarray(render_heatmaps(pts, size))
            atomic_write(dest, lambda tmp: maps.save(tmp), durable=False)
            written += 1
        if progress is not None:
            progress(k + 1, len(rows))
    return written


def ensure_heatmaps(images: ImageList, root: str | Path | None = None) -> None:
    """Check every image of ``images`` has a stored heat-map; for the built-in data (a
    ``root`` holding ``synth_factors.jsonl``) render missing ones first. Raises
    :class:`DataError` naming the missing files otherwise."""
    missing = [p for p in images.paths if not heatmap_path(p).is_file()]
    if missing and root is not None:
        # the RAF-DB reader takes the "basic" directory or its parent: so do we
        for base in (Path(root), Path(root) / "basic"):
            if (base / "synth_factors.jsonl").is_file():
                write_synth_heatmaps(base)
                break
        missing = [p for p in missing if not heatmap_path(p).is_file()]
    if missing:
        few = ", ".join(str(heatmap_path(p)) for p in missing[:3])
        raise DataError(f"{len(missing)} of {len(images)} images of {images.source} have no "
                        f"landmark heat-map (expected e.g. {few}); PCD with model.landmarks="
                        "'heatmap' needs DIR/landmarks/NAME.png beside each image")


def read_heatmap(image: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """The stored heat-map of ``image`` as ``uint8 [channels, size, size]``."""
    path = heatmap_path(image)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im).copy()
    except FileNotFoundError:
        raise DataError(f"landmark heat-map not found: {path}") from None
    except Exception as exc:
        raise DataError(f"cannot read landmark heat-map {path}: {exc}") from None
    t = torch.from_numpy(arr)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return t[:channels]


class HeatmapTransform:
    """``uint8 [3 + L, S, S] -> float32 [3 + L, S, S]``: a joint random horizontal flip
    (train), then the image part as in :func:`qcs.data.train_transform` (colour jitter,
    normalise, random erasing) or :func:`test_transform`; the maps scaled to ``[0, 1]``.

    A left-right flip swaps the eyes, so the two eye channels (0 and 1 of the maps) are
    swapped with it; with one channel or a single map nothing is swapped."""

    def __init__(self, train: bool) -> None:
        self.train = train
        self.jitter = v2.ColorJitter(0.2, 0.2, 0.2, 0.1)
        self.erase = v2.RandomErasing(scale=(0.02, 0.1))
        self.norm = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        img, maps = x[:3], x[3:]
        if self.train and torch.rand(()) < 0.5:
            img, maps = img.flip(-1), maps.flip(-1)
            if maps.shape[0] >= 2:
                maps = maps[[1, 0, *range(2, maps.shape[0])]]
        if self.train:
            img = self.jitter(img)
        img = self.norm(img.float() / 255)
        if self.train:
            img = self.erase(img)
        return torch.cat([img, maps.float() / 255])


class HeatmapDataset(TransformedItems):
    """An :class:`ImageDataset` with each image's stored heat-map appended as channels.

    ``dataset[i] -> (x [3 + L, S, S], label)``; ``dataset[(i, j, ...)] ->
    (x [R, 3 + L, S, S], labels [R])``; like :class:`ImageDataset`, optionally decoded once
    and kept in memory.
    """

    def __init__(self, images: ImageList, size: int, transform: Callable | None = None,
                 cache: bool = False, channels: int = 3,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.images_ds = ImageDataset(images, size, None, cache=cache, progress=progress)
        self.images, self.size, self.transform = images, size, transform
        self.channels = channels
        self.labels = self.images_ds.labels
        self._maps: torch.Tensor | None = None
        if cache:
            self._maps = torch.stack([read_heatmap(p, size, channels) for p in images.paths])

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> torch.Tensor:
        """``uint8 [3 + L, S, S]`` before the transform."""
        maps = (self._maps[i] if self._maps is not None
                else read_heatmap(self.images.paths[i], self.size, self.channels))
        return torch.cat([self.images_ds.raw(i), maps])
