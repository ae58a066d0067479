"""Readers for the dataset layouts users have, all returning an :class:`ImageList`.

Every reader takes the dataset root and a split (``train`` / ``test``) and reports bad
input by file name: a missing list file, a malformed line (file and line number), an
image that is missing or cannot be decoded (:class:`DataError`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DataError", "ImageList", "ImageDataset", "raf_db", "ferplus", "affectnet", "folder",
    "RAF_DB_CLASSES", "FERPLUS_CLASSES", "AFFECTNET_CLASSES", "load_split", "check_images",
]

RAF_DB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt")
AFFECTNET_CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                     "contempt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(RuntimeError):
    """A dataset file is missing, malformed or unreadable (the message names it)."""


@dataclass
class ImageList:
    """Image paths, integer labels ``0..K-1`` and the class names in label order."""

    paths: list[Path]
    labels: list[int]
    classes: tuple[str, ...]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64),
                           minlength=len(self.classes)).tolist()


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _raf_root(root: Path) -> Path:
    # accept the "basic" directory itself or its parent
    if not (root / "EmoLabel").is_dir() and (root / "basic" / "EmoLabel").is_dir():
        return root / "basic"
    return root


def raf_db(root: str | Path, split: str, list_file: str = "") -> ImageList:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``, labels 1-7)
    and images in ``Image/aligned`` (``train_00001_aligned.jpg``), ``Image/original`` or the
    root itself. ``split`` selects names starting with ``train`` / ``test``."""
    root = _raf_root(Path(root))
    labels_path = root / (list_file or "EmoLabel/list_patition_label.txt")
    _need_file(labels_path, "RAF-DB label list")
    dirs = [root / "Image" / "aligned", root / "Image" / "original", root]
    paths, labels = [], []
    for lineno, line in enumerate(labels_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
            raise DataError(f"{labels_path}:{lineno}: expected 'name label' with label 1-7, "
                            f"got {line!r}")
        name = parts[0]
        if not name.startswith(split):
            continue
        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "jpg")
        candidates = [dirs[0] / f"{stem}_aligned.{suffix}", dirs[0] / name, dirs[1] / name,
                      dirs[2] / name]
        path = next((c for c in candidates if c.exists()), candidates[0])
        paths.append(path)
        labels.append(int(parts[1]) - 1)
    if not paths:
        raise DataError(f"{labels_path}: no '{split}' entries")
    return ImageList(paths, labels, RAF_DB_CLASSES, f"raf-db {root} [{split}]")


def _ferplus_majority(votes: list[float]) -> int | None:
    """FERPlus majority vote over 10 columns (8 emotions, unknown, not-a-face): single
    votes are discarded as outliers; the top class wins if it holds more than half of
    the remaining votes. ``None`` when there is no majority or it is unknown / not-a-face."""
    kept = [v if v > 1 else 0.0 for v in votes]
    total = sum(kept)
    if total <= 0:
        return None
    top = int(np.argmax(kept))
    if kept[top] <= 0.5 * total or top >= 8:
        return None
    return top


def ferplus(root: str | Path, split: str, list_file: str = "") -> ImageList:
    """FERPlus as its generator lays it out: ``FER2013Train`` / ``FER2013Valid`` /
    ``FER2013Test`` folders, each with the PNGs and a ``label.csv`` (``name, box, 10 vote
    counts``). Majority-vote labels; unknown / not-a-face / no-majority images dropped.
    ``split`` is ``train``, ``valid`` or ``test``."""
    root = Path(root)
    folder = {"train": "FER2013Train", "valid": "FER2013Valid", "val": "FER2013Valid",
              "test": "FER2013Test"}.get(split)
    if folder is None:
        raise DataError(f"FERPlus split must be train, valid or test, got {split!r}")
    labels_path = _need_file(root / (list_file or f"{folder}/label.csv"), "FERPlus label file")
    image_dir = labels_path.parent
    paths, labels, dropped = [], [], 0
    with labels_path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not row[0].strip():
                continue
            try:
                votes = [float(v) for v in row[2:12]]
            except ValueError:
                raise DataError(f"{labels_path}:{lineno}: vote counts are not numbers: "
                                f"{row!r}") from None
            if len(votes) != 10:
                raise DataError(f"{labels_path}:{lineno}: expected name, box and 10 vote "
                                f"counts, got {len(row)} fields")
            label = _ferplus_majority(votes)
            if label is None:
                dropped += 1
                continue
            paths.append(image_dir / row[0].strip())
            labels.append(label)
    out = ImageList(paths, labels, FERPLUS_CLASSES, f"ferplus {root} [{split}]")
    out.notes.append(f"{dropped} images without a majority / unknown / not-a-face dropped")
    return out


def affectnet(root: str | Path, split: str, num_classes: int = 7, list_file: str = "") -> ImageList:
    """AffectNet-7 / -8 (manually annotated subset). List files, relative to ``root``:
    the official ``Manually_Annotated_file_lists/training.csv`` / ``validation.csv``
    (header with ``subDirectory_filePath`` and ``expression``; images under
    ``Manually_Annotated_Images``) or, via ``list_file``, plain ``relative/path label`` lines.
    Expression codes 0-7 (neutral, happy, sad, surprise, fear, disgust, anger, contempt);
    AffectNet-7 drops contempt; codes >= 8 (none / uncertain / no face) are dropped.
    The validation set is the test split."""
    if num_classes not in (7, 8):
        raise DataError(f"AffectNet has 7 or 8 classes, got {num_classes}")
    root = Path(root)
    default = {"train": "Manually_Annotated_file_lists/training.csv",
               "test": "Manually_Annotated_file_lists/validation.csv"}.get(split)
    if not list_file and default is None:
        raise DataError(f"AffectNet split must be train or test, got {split!r}")
    labels_path = _need_file(root / (list_file or default), "AffectNet list file")
    rows: list[tuple[str, str]] = []
    image_dir = root
    with labels_path.open(newline="") as fh:
        first = fh.readline()
        fh.seek(0)
        if "subDirectory_filePath" in first:
            image_dir = root / "Manually_Annotated_Images"
            for row in csv.DictReader(fh):
                rows.append((row["subDirectory_filePath"], row["expression"]))
        else:
            for line in fh:
                if line.strip():
                    parts = line.rsplit(maxsplit=1)
                    rows.append((parts[0], parts[1] if len(parts) == 2 else ""))
    paths, labels = [], []
    for i, (name, code) in enumerate(rows, 1):
        if not code.strip().lstrip("-").isdigit():
            raise DataError(f"{labels_path}: entry {i} ({name!r}) has no integer label")
        c = int(code)
        if 0 <= c < num_classes:
            paths.append(image_dir / name)
            labels.append(c)
    return ImageList(paths, labels, AFFECTNET_CLASSES[:num_classes],
                     f"affectnet{num_classes} {root} [{split}]")


def folder(root: str | Path, split: str, classes: tuple[str, ...] | None = None) -> ImageList:
    """Class-per-folder tree ``root/<split>/<class>/<image>``; classes sorted by name unless
    given."""
    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"folder dataset: {base} is not a directory")
    names = classes or tuple(sorted(p.name for p in base.iterdir() if p.is_dir()))
    if not names:
        raise DataError(f"folder dataset: {base} has no class sub-directories")
    paths, labels = [], []
    for k, name in enumerate(names):
        for p in sorted((base / name).iterdir()) if (base / name).is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(k)
    return ImageList(paths, labels, tuple(names), f"folder {base}")


def load_split(fmt: str, root: str | Path, split: str, list_file: str = "") -> ImageList:
    """Dispatch on ``fmt`` (``raf-db`` and ``synth`` | ``ferplus`` | ``affectnet7`` |
    ``affectnet8`` | ``folder``)."""
    if fmt in ("raf-db", "synth"):
        return raf_db(root, split, list_file)
    if fmt == "ferplus":
        return ferplus(root, split, list_file)
    if fmt in ("affectnet7", "affectnet8"):
        return affectnet(root, split, int(fmt[-1]), list_file)
    if fmt == "folder":
        return folder(root, split)
    raise DataError(f"unknown data format {fmt!r}")


def read_image(path: Path) -> Image.Image:
    """Open ``path`` as RGB, or raise :class:`DataError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {exc}") from None


def check_images(images: ImageList, progress: Callable[[int, int], None] | None = None
                 ) -> list[str]:
    """Open and fully decode every image; return one message per bad file."""
    bad = []
    for i, path in enumerate(images.paths):
        try:
            read_image(path).load()
        except DataError as exc:
            bad.append(str(exc))
        if progress is not None:
            progress(i + 1, len(images))
    return bad


class TransformedItems(torch.utils.data.Dataset):
    """Indexing shared by the image datasets: ``ds[i] -> (x, label)`` and, for a sampled
    tuple of indices, ``ds[(i, j, ...)] -> (x [R, ...], labels [R])``. Subclasses define
    ``raw(i)`` (the untransformed tensor), ``transform`` and ``labels``."""

    def _one(self, i: int) -> torch.Tensor:
        x = self.raw(i)
        return self.transform(x) if self.transform is not None else x

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):
            return torch.stack([self._one(int(i)) for i in index]), self.labels[list(index)]
        return self._one(int(index)), self.labels[int(index)]


class ImageDataset(TransformedItems):
    """Images of an :class:`ImageList` as ``uint8 [3, S, S]`` tensors (resized to
    ``size``), optionally decoded once and kept in memory, then ``transform``.

    ``dataset[i] -> (image [3, S, S] after transform, label)``;
    ``dataset[(i, j, ...)] -> (images [R, 3, S, S], labels [R])`` (a sampled tuple).
    """

    def __init__(self, images: ImageList, size: int, transform: Callable | None = None,
                 cache: bool = False, progress: Callable[[int, int], None] | None = None):
        self.images, self.size, self.transform = images, size, transform
        self.labels = torch.tensor(images.labels, dtype=torch.long)
        self._cache: torch.Tensor | None = None
        if cache:
            data = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
            for i in range(len(images)):
                data[i] = self._decode(i)
                if progress is not None:
                    progress(i + 1, len(images))
            self._cache = data

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, i: int) -> torch.Tensor:
        img = read_image(self.images.paths[i])
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    def raw(self, i: int) -> torch.Tensor:
        """``uint8 [3, S, S]`` before the transform."""
        return self._cache[i] if self._cache is not None else self._decode(i)
