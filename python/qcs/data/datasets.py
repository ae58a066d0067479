"""Readers for the dataset layouts users have, all returning an :class:`ImageList`.

Every reader takes the dataset root and a split (``train`` / ``test``) and reports bad
input by file name: a missing list file, a malformed line or a label out of range (file and
line number), an image that is missing or cannot be decoded (:class:`DataError`).

With ``skip_bad=True`` a reader records bad lines in :attr:`ImageList.skipped` (reason ->
messages) instead of raising; :func:`screen_images` does the same for unreadable images and
:func:`empty_classes` finds classes left without images, so a run can go on over the rest
and say what it dropped (:func:`skip_summary`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError

__all__ = [
    "AFFECTNET_CLASSES",
    "FERPLUS_CLASSES",
    "RAF_DB_CLASSES",
    "SKIP_REASONS",
    "DataError",
    "ImageDataset",
    "ImageList",
    "affectnet",
    "check_images",
    "empty_classes",
    "ferplus",
    "folder",
    "load_split",
    "raf_db",
    "screen_data",
    "screen_images",
    "skip_summary",
]

RAF_DB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt")
AFFECTNET_CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                     "contempt")
log = logging.getLogger("qcs")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# why an item was skipped under skip_bad, in the order summaries print them
SKIP_REASONS = ("malformed line", "label out of range", "missing image", "unreadable image",
                "single-image class", "empty class")


@dataclass
class ImageList:
    """Image paths, integer labels ``0..K-1`` and the class names in label order."""

    paths: list[Path]
    labels: list[int]
    classes: tuple[str, ...]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # where each image was listed ("FILE:LINE"), when the reader knows; names it in errors
    origins: list[str] = field(default_factory=list)
    # skip_bad: reason (one of SKIP_REASONS) -> one message per skipped line / image
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def origin(self, i: int) -> str:
        """`` (listed at FILE:LINE)`` for image ``i``, or ``""`` if unknown."""
        return f" (listed at {self.origins[i]})" if i < len(self.origins) else ""

    def subset(self, keep: list[int]) -> ImageList:
        """The images at indices ``keep`` (same classes, notes and skip record)."""
        return ImageList([self.paths[i] for i in keep], [self.labels[i] for i in keep],
                         self.classes, self.source, list(self.notes),
                         [self.origins[i] for i in keep] if self.origins else [],
                         {k: list(v) for k, v in self.skipped.items()})

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64),
                           minlength=len(self.classes)).tolist()


class _Bad:
    """Raise on a bad line, or record it when ``skip_bad``."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: dict[str, list[str]] = {}

    def __call__(self, reason: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message + " (--skip-bad skips such lines)")
        self.skipped.setdefault(reason, []).append(message)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _raf_root(root: Path) -> Path:
    # accept the "basic" directory itself or its parent
    if not (root / "EmoLabel").is_dir() and (root / "basic" / "EmoLabel").is_dir():
        return root / "basic"
    return root


def raf_db(root: str | Path, split: str, list_file: str = "", skip_bad: bool = False
           ) -> ImageList:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``, labels 1-7)
    and images in ``Image/aligned`` (``train_00001_aligned.jpg``), ``Image/original`` or the
    root itself. ``split`` selects names starting with ``train`` / ``test``. A malformed line
    or a label outside 1-7 raises :class:`DataError` naming file and line (``skip_bad``:
    recorded in ``skipped`` and left out)."""
    root = _raf_root(Path(root))
    labels_path = root / (list_file or "EmoLabel/list_patition_label.txt")
    _need_file(labels_path, "RAF-DB label list")
    dirs = [root / "Image" / "aligned", root / "Image" / "original", root]
    paths, labels, origins, bad = [], [], [], _Bad(skip_bad)
    for lineno, line in enumerate(labels_path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{labels_path}:{lineno}"
        label = _int_or_none(parts[1]) if len(parts) == 2 else None
        if len(parts) != 2 or label is None:
            problem = ("missing label" if len(parts) == 1 else
                       f"{len(parts)} fields" if len(parts) > 2 else "label is not an integer")
            bad("malformed line", f"{where}: expected 'name label' with label 1-7 ({problem}), "
                f"got {line!r}")
            continue
        if not 1 <= label <= 7:
            bad("label out of range", f"{where}: label {label} out of range, expected 'name "
                f"label' with label 1-7, got {line!r}")
            continue
        name = parts[0]
        if not name.startswith(split):
            continue
        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "jpg")
        candidates = [dirs[0] / f"{stem}_aligned.{suffix}", dirs[0] / name, dirs[1] / name,
                      dirs[2] / name]
        path = next((c for c in candidates if c.exists()), candidates[0])
        paths.append(path)
        labels.append(label - 1)
        origins.append(where)
    if not paths:
        raise DataError(f"{labels_path}: no '{split}' entries")
    return ImageList(paths, labels, RAF_DB_CLASSES, f"raf-db {root} [{split}]",
                     origins=origins, skipped=bad.skipped)


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


def ferplus(root: str | Path, split: str, list_file: str = "", skip_bad: bool = False
            ) -> ImageList:
    """FERPlus as its generator lays it out: ``FER2013Train`` / ``FER2013Valid`` /
    ``FER2013Test`` folders, each with the PNGs and a ``label.csv`` (``name, box, 10 vote
    counts``). Majority-vote labels; unknown / not-a-face / no-majority images dropped.
    ``split`` is ``train``, ``valid`` or ``test``. A row without exactly a name, a box and 10
    numeric vote counts raises :class:`DataError` naming file and line (``skip_bad``:
    recorded in ``skipped`` and left out)."""
    root = Path(root)
    folder = {"train": "FER2013Train", "valid": "FER2013Valid", "val": "FER2013Valid",
              "test": "FER2013Test"}.get(split)
    if folder is None:
        raise DataError(f"FERPlus split must be train, valid or test, got {split!r}")
    labels_path = _need_file(root / (list_file or f"{folder}/label.csv"), "FERPlus label file")
    image_dir = labels_path.parent
    paths, labels, origins, dropped, bad = [], [], [], 0, _Bad(skip_bad)
    with labels_path.open(newline="", errors="replace") as fh:
        reader = csv.reader(fh)
        for row in reader:
            where = f"{labels_path}:{reader.line_num}"
            if not row or not row[0].strip():
                continue
            if len(row) != 12:
                bad("malformed line", f"{where}: expected name, box and 10 vote counts, got "
                    f"{len(row)} fields")
                continue
            try:
                votes = [float(v) for v in row[2:12]]
            except ValueError:
                bad("malformed line", f"{where}: vote counts are not numbers: {row!r}")
                continue
            if any(not v >= 0 for v in votes):  # also catches NaN
                bad("label out of range", f"{where}: vote counts must be >= 0: {row!r}")
                continue
            label = _ferplus_majority(votes)
            if label is None:
                dropped += 1
                continue
            paths.append(image_dir / row[0].strip())
            labels.append(label)
            origins.append(where)
    out = ImageList(paths, labels, FERPLUS_CLASSES, f"ferplus {root} [{split}]",
                    origins=origins, skipped=bad.skipped)
    out.notes.append(f"{dropped} images without a majority / unknown / not-a-face dropped")
    return out


def affectnet(root: str | Path, split: str, num_classes: int = 7, list_file: str = "",
              skip_bad: bool = False) -> ImageList:
    """AffectNet-7 / -8 (manually annotated subset). List files, relative to ``root``:
    the official ``Manually_Annotated_file_lists/training.csv`` / ``validation.csv``
    (header with ``subDirectory_filePath`` and ``expression``; images under
    ``Manually_Annotated_Images``) or, via ``list_file``, plain ``relative/path label`` lines.
    Expression codes 0-7 (neutral, happy, sad, surprise, fear, disgust, anger, contempt);
    AffectNet-7 drops contempt; codes 8-10 (none / uncertain / no face) are dropped.
    The validation set is the test split. A line without an integer code, or a code outside
    0-10, raises :class:`DataError` naming file and line (``skip_bad``: recorded in
    ``skipped`` and left out)."""
    if num_classes not in (7, 8):
        raise DataError(f"AffectNet has 7 or 8 classes, got {num_classes}")
    root = Path(root)
    default = {"train": "Manually_Annotated_file_lists/training.csv",
               "test": "Manually_Annotated_file_lists/validation.csv"}.get(split)
    if not list_file and default is None:
        raise DataError(f"AffectNet split must be train or test, got {split!r}")
    labels_path = _need_file(root / (list_file or default), "AffectNet list file")
    rows: list[tuple[int, str, str | None]] = []  # (line, name, code)
    image_dir = root
    with labels_path.open(newline="", errors="replace") as fh:
        first = fh.readline()
        fh.seek(0)
        if "subDirectory_filePath" in first:
            image_dir = root / "Manually_Annotated_Images"
            reader = csv.DictReader(fh)
            for row in reader:
                rows.append((reader.line_num, row.get("subDirectory_filePath") or "",
                             row.get("expression")))
        else:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    parts = line.rsplit(maxsplit=1)
                    rows.append((lineno, parts[0], parts[1] if len(parts) == 2 else None))
    paths, labels, origins, bad = [], [], [], _Bad(skip_bad)
    for lineno, name, code in rows:
        where = f"{labels_path}:{lineno}"
        c = _int_or_none(code.strip()) if code is not None else None
        if not name.strip() or c is None:
            problem = ("missing label" if code is None or not code.strip() else
                       f"label {code.strip()!r} is not an integer" if name.strip() else
                       "missing image path")
            bad("malformed line", f"{where}: expected an image path and an integer expression "
                f"code ({problem}), entry {name!r}")
            continue
        if not 0 <= c <= 10:
            bad("label out of range", f"{where}: expression code {c} out of range 0-10 "
                f"({name!r})")
            continue
        if c < num_classes:  # 8-10 (and 7 for AffectNet-7) are not expression classes
            paths.append(image_dir / name)
            labels.append(c)
            origins.append(where)
    return ImageList(paths, labels, AFFECTNET_CLASSES[:num_classes],
                     f"affectnet{num_classes} {root} [{split}]", origins=origins,
                     skipped=bad.skipped)


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


def load_split(fmt: str, root: str | Path, split: str, list_file: str = "",
               skip_bad: bool = False) -> ImageList:
    """Dispatch on ``fmt`` (``raf-db`` and ``synth`` | ``ferplus`` | ``affectnet7`` |
    ``affectnet8`` | ``folder``); ``skip_bad`` records bad list lines instead of raising."""
    if fmt in ("raf-db", "synth"):
        return raf_db(root, split, list_file, skip_bad)
    if fmt == "ferplus":
        return ferplus(root, split, list_file, skip_bad)
    if fmt in ("affectnet7", "affectnet8"):
        return affectnet(root, split, int(fmt[-1]), list_file, skip_bad)
    if fmt == "folder":
        return folder(root, split)
    raise DataError(f"unknown data format {fmt!r}")


def read_image(path: Path) -> Image.Image:
    """Open ``path`` as RGB with its EXIF orientation applied (as ``qcs predict`` reads
    photos), or raise :class:`DataError` naming it."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {exc}") from None


def check_images(images: ImageList, progress: Callable[[int, int], None] | None = None
                 ) -> list[str]:
    """Open and fully decode every image; return one message per bad file."""
    return [msg for _, _, msg in _bad_images(images, progress)]


def _bad_images(images: ImageList, progress: Callable[[int, int], None] | None
                ) -> list[tuple[int, str, str]]:
    """``(index, reason, message)`` of every image that is missing or does not decode."""
    bad = []
    for i, path in enumerate(images.paths):
        try:
            read_image(path).load()
        except DataError as exc:
            reason = "missing image" if not path.exists() else "unreadable image"
            bad.append((i, reason, f"{exc}{images.origin(i)}"))
        if progress is not None:
            progress(i + 1, len(images))
    return bad


def screen_images(images: ImageList, skip_bad: bool,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[ImageList, list[str]]:
    """Decode every image of ``images`` once (PIL raises on truncated and corrupt files).

    Returns ``(kept, bad messages)``. With ``skip_bad`` the bad images are left out of
    ``kept`` and recorded in its ``skipped``, so no sampler ever draws them; without it
    ``kept`` is ``images`` and the caller decides (raise, listing every message)."""
    bad = _bad_images(images, progress)
    if not skip_bad or not bad:
        return images, [msg for _, _, msg in bad]
    drop = {i for i, _, _ in bad}
    kept = images.subset([i for i in range(len(images)) if i not in drop])
    for _, reason, msg in bad:
        kept.skipped.setdefault(reason, []).append(msg)
    return kept, [msg for _, _, msg in bad]


def empty_classes(images: ImageList) -> list[str]:
    """One message per class of ``images`` without any image (a list file that never uses
    a label, a class folder without images, or every image of it skipped)."""
    return [f"{images.source}: class {name!r} (label {k}) has no images"
            for k, (name, n) in enumerate(zip(images.classes, images.counts())) if n == 0]


def skip_summary(lists: list[ImageList]) -> tuple[dict[str, int], list[str]]:
    """Counts per reason and the messages of everything ``lists`` skipped; a list file
    line read for both splits counts once."""
    seen: dict[str, dict[str, None]] = {}
    for lst in lists:
        for reason, messages in lst.skipped.items():
            seen.setdefault(reason, {}).update(dict.fromkeys(messages))
    order = [r for r in SKIP_REASONS if r in seen] + [r for r in seen if r not in SKIP_REASONS]
    return ({r: len(seen[r]) for r in order}, [m for r in order for m in seen[r]])


def single_image_classes(images: ImageList, min_per_class: int) -> list[int]:
    """Labels of the classes of ``images`` that have some images but fewer than
    ``min_per_class``."""
    return [k for k, n in enumerate(images.counts()) if 0 < n < min_per_class]


def screen_data(train: ImageList, test: ImageList, *, decode: bool, skip_bad: bool,
                show_progress: bool = True, min_per_class: int = 1
                ) -> tuple[ImageList, ImageList]:
    """Start-up checks of a train / test pair, as ``qcs train`` and ``qcs eval`` run them.

    ``decode`` (``--check-data``, implied by ``--skip-bad``): decode every image of both
    splits. Then look for training classes without images. Without ``skip_bad`` any problem
    raises one :class:`DataError` listing all of them; with it the bad images are dropped,
    empty classes are kept (the sampler never draws them) and a count per reason is logged
    (``skipped 5 items (--skip-bad): 2 malformed line, ...``) with one line per item.
    ``min_per_class`` (2 for QCS / DCS, whose positive is another image of the anchor's
    class): a training class with fewer images is an error, or with ``skip_bad`` is left
    out of training like an empty class.
    Returns the (possibly reduced) ``(train, test)``."""
    from ..logs import Ticker
    lists = [train, test]
    if decode:
        unreadable = []
        for k, lst in enumerate(lists):
            ticker = Ticker(f"checking {lst.source}", enabled=show_progress)
            lists[k], bad = screen_images(lst, skip_bad, ticker)
            ticker.close()
            unreadable += bad
        if unreadable and not skip_bad:
            raise DataError(f"{len(unreadable)} unreadable images (--skip-bad leaves them "
                            "out):\n  " + "\n  ".join(unreadable))
        if not unreadable:
            log.info("all %d images readable", sum(len(lst) for lst in lists))
    small = single_image_classes(lists[0], min_per_class)
    if small:
        train_list = lists[0]
        counts = train_list.counts()
        messages = [f"{train_list.source}: class {train_list.classes[k]!r} (label {k}) has "
                    f"{counts[k]} image(s); the quadruplet / pair sampler needs at least "
                    f"{min_per_class} (a positive other than the anchor)" for k in small]
        if not skip_bad:
            raise DataError("the training split has classes too small to sample (--skip-bad "
                            "trains without them):\n  " + "\n  ".join(messages))
        lists[0] = train_list.subset([i for i, y in enumerate(train_list.labels)
                                      if y not in small])
        lists[0].skipped["single-image class"] = messages
    empty = [m for m in empty_classes(lists[0])
             if not any(f"(label {k})" in m for k in small)]
    if empty and not skip_bad:
        raise DataError("the training split has empty classes (--skip-bad trains without "
                        "them):\n  " + "\n  ".join(empty))
    if empty:
        lists[0].skipped["empty class"] = empty
    counts, messages = skip_summary(lists)
    if counts:
        log.warning("skipped %d items (--skip-bad): %s", sum(counts.values()),
                    ", ".join(f"{n} {reason}" for reason, n in counts.items()))
        for msg in messages:
            log.warning("  skipped: %s", msg)
    return lists[0], lists[1]


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
        try:
            img = read_image(self.images.paths[i])
        except DataError as exc:  # name the list line too; decode errors show up lazily here
            raise DataError(f"{exc}{self.images.origin(i)}") from None
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    def raw(self, i: int) -> torch.Tensor:
        """``uint8 [3, S, S]`` before the transform."""
        return self._cache[i] if self._cache is not None else self._decode(i)
