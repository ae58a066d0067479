"""``qcs predict``: facial-expression labels for the faces in image files.

Pipeline per image: read (any PIL mode; grey-scale, palette, 16-bit and RGBA inputs are
converted to RGB and the conversion is noted in the file's record), detect faces, square
crop with a margin (optionally levelled by the eye line), resize to the checkpoint's
``data.image_size`` and classify with the *base* network in batches.

Face detection uses OpenCV's frontal-face Haar cascade, which ships inside the
``opencv-python-headless`` wheel (4.x; the 5.x wheels no longer bundle the cascade
files), so it works offline with no model download. It is a classic detector: fast on the
CPU, frontal faces only, no landmarks (we align with the bundled eye cascade when both
eyes are found). Install it with ``pip install 'qcs-ext[predict]'``; ``--no-detect``
(images that already are face crops) does not need it.

Every input yields records, never an exception: ``status`` is ``ok`` (one record per face),
``no_face`` or ``error`` (missing / unreadable file, with the reason).
"""

from __future__ import annotations

import csv
import glob
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .data.datasets import IMAGE_SUFFIXES
from .errors import MissingDependency, UsageError
from .inference import LoadedModel

__all__ = [
    "CSV_FIXED",
    "FaceDetector",
    "Predictor",
    "collect_inputs",
    "read_rgb",
    "square_crop",
    "write_records",
]

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the original image


# --------------------------------------------------------------------------- inputs
def collect_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, directories (recursively, image suffixes only, sorted) and glob
    patterns (``**`` allowed) into image paths, without duplicates, in argument order.

    Returns ``(paths, problems)``; ``problems`` are ``(argument, reason)`` pairs for
    arguments that name nothing (reported per input, never raised).
    """
    paths: list[Path] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*")
                           if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((arg, f"directory has no images ({', '.join(IMAGE_SUFFIXES)})"))
            for q in found:
                add(q)
        elif p.exists():
            add(p)  # an explicit file is tried whatever its suffix
        elif glob.has_magic(arg):
            found = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            found = [q for q in found if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                problems.append((arg, "pattern matches no image files"))
            for q in found:
                add(q)
        else:
            problems.append((arg, "no such file or directory"))
    return paths, problems


def read_rgb(path: Path) -> tuple[Image.Image, list[str]]:
    """Open ``path`` as an RGB image (EXIF orientation applied) and say what conversion was
    needed: grey-scale and palette images are expanded, 16-bit / float images rescaled to
    8 bits, and transparent images composited over white. Raises ``OSError`` / ``ValueError``
    (from PIL) for files that are not images."""
    notes: list[str] = []
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), "L")
        notes.append(f"{mode} image rescaled to 8-bit grey")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        notes.append("palette image expanded")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
        notes.append(f"{mode} alpha composited over white")
    elif im.mode in ("L", "1"):
        im = im.convert("RGB")
        notes.append("grey-scale image converted to RGB")
    elif im.mode != "RGB":
        notes.append(f"{im.mode} image converted to RGB")
        im = im.convert("RGB")
    return im, notes


# --------------------------------------------------------------------------- detection
def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependency(
            "face detection needs OpenCV: pip install 'qcs-ext[predict]' (or "
            "'opencv-python-headless<5'); use --no-detect for images that are already face "
            "crops") from None
    return cv2


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area (1 when one box contains the other)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1, min(a[2] * a[3], b[2] * b[3]))


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade (no download).

    ``detect(rgb uint8 [H, W, 3]) -> [(box, score)]``, boxes ``(x, y, w, h)``, best first.
    Overlapping detections (one box covering more than ``overlap`` of a smaller one) are
    merged, keeping the higher cascade score, so each face is reported once.
    """

    def __init__(self, min_neighbors: int = 5, scale_factor: float = 1.1,
                 min_size: float = 0.06, overlap: float = 0.5, align: bool = True) -> None:
        cv2 = _cv2()
        root = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "")
        face_file, eye_file = (root / "haarcascade_frontalface_default.xml",
                               root / "haarcascade_eye.xml")
        if not face_file.is_file():
            raise MissingDependency(
                f"OpenCV {cv2.__version__} does not ship the Haar cascade files (looked for "
                f"{face_file}); install 'opencv-python-headless<5', whose 4.x wheels include them")
        self.cv2 = cv2
        self.face = cv2.CascadeClassifier(str(face_file))
        self.eyes = cv2.CascadeClassifier(str(eye_file)) if align and eye_file.is_file() else None
        self.min_neighbors, self.scale_factor = min_neighbors, scale_factor
        self.min_size, self.overlap = min_size, overlap

    def _grey(self, rgb: np.ndarray) -> np.ndarray:
        # no histogram equalisation: the cascade normalises each window's contrast itself,
        # and equalising flat, mostly uniform images made detection worse in our tests
        return self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)

    def detect(self, rgb: np.ndarray) -> list[tuple[Box, float]]:
        grey = self._grey(rgb)
        side = max(24, int(self.min_size * min(grey.shape)))
        boxes, _, weights = self.face.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(side, side), outputRejectLevels=True)
        found = sorted(((tuple(int(v) for v in b), float(w))
                        for b, w in zip(boxes, np.ravel(weights))), key=lambda t: -t[1])
        kept: list[tuple[Box, float]] = []
        for box, score in found:
            if all(_overlap(box, k) <= self.overlap for k, _ in kept):
                kept.append((box, score))
        return kept

    def eye_angle(self, rgb: np.ndarray, box: Box) -> float | None:
        """Roll of the eye line in degrees (positive: the right eye of the image is lower),
        from the two largest eye detections in the upper half of ``box``; ``None`` when two
        plausible eyes are not found."""
        if self.eyes is None:
            return None
        x, y, w, h = box
        roi = self._grey(rgb[y:y + h // 2 + 1, x:x + w])
        if roi.size == 0:
            return None
        eyes = self.eyes.detectMultiScale(roi, 1.1, 5, minSize=(max(4, w // 10),) * 2)
        if len(eyes) < 2:
            return None
        eyes = sorted(eyes, key=lambda e: -e[2] * e[3])[:2]
        (x1, y1), (x2, y2) = sorted((ex + ew / 2, ey + eh / 2) for ex, ey, ew, eh in eyes)
        if x2 - x1 < w / 5:  # the same eye twice, or eye + brow
            return None
        angle = math.degrees(math.atan2(y2 - y1, x2 - x1))
        return angle if abs(angle) <= 30 else None


def square_crop(image: Image.Image, box: Box, margin: float, angle: float | None = None
                ) -> Image.Image:
    """The square around ``box``'s centre with side ``max(w, h) * (1 + 2 * margin)``; parts
    outside the image are black. With ``angle`` (degrees) the crop is rotated about the
    face centre so that the eye line is level."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h) * (1 + 2 * margin)
    if angle is None:
        half = side / 2
        return image.crop((round(cx - half), round(cy - half), round(cx + half),
                           round(cy + half)))
    half = side * 0.75  # room for the rotation, cut back to `side` below
    big = image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    big = big.rotate(angle, resample=Image.BILINEAR)
    c, s2 = big.width / 2, side / 2
    return big.crop((round(c - s2), round(c - s2), round(c + s2), round(c + s2)))


# --------------------------------------------------------------------------- prediction
@dataclass
class _Pending:
    path: Path
    image: Image.Image | None
    notes: list[str]
    faces: list[tuple[Box, float | None, float | None]] = field(default_factory=list)
    first: int = 0              # index of this file's first crop in the batch buffer
    status: str = "ok"
    error: str = ""


class Predictor:
    """Detect, crop and classify.

    Args:
        loaded: the checkpoint's base network (:func:`qcs.inference.load_model`).
        detect: run face detection (``False``: each image is one aligned face crop).
        margin: crop margin on each side, as a fraction of the detected box.
        batch_size: crops per forward pass.
        annotate_dir: write each image with its boxes and labels drawn there.
        detector: a ready :class:`FaceDetector` (default: built when ``detect``).
    """

    def __init__(self, loaded: LoadedModel, *, detect: bool = True, margin: float = 0.2,
                 batch_size: int = 32, annotate_dir: str | Path | None = None,
                 align: bool = True, device: str | torch.device = "cpu",
                 detector: FaceDetector | None = None) -> None:
        if margin < 0:
            raise UsageError(f"--margin must be >= 0, got {margin}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        refusal = loaded.family.input_error(loaded.channels, loaded.base)
        if refusal is not None:  # e.g. PCD reading heat maps stored beside the images
            raise refusal
        self.loaded, self.classes = loaded, loaded.classes
        self.size = loaded.image_size
        self.transform = loaded.transform()
        self.margin, self.batch_size, self.device = margin, batch_size, torch.device(device)
        self.detector = (detector or FaceDetector(align=align)) if detect else None
        self.align = align
        self.annotate_dir = Path(annotate_dir) if annotate_dir else None
        if self.annotate_dir is not None:
            self.annotate_dir.mkdir(parents=True, exist_ok=True)
        self._annotated: set[str] = set()

    @torch.no_grad()
    def _classify(self, crops: list[Image.Image]) -> torch.Tensor:
        """PIL crops -> probabilities ``[n, K]`` (float32, CPU)."""
        if not crops:
            return torch.empty(0, len(self.classes))
        xs = []
        for crop in crops:
            crop = crop.resize((self.size, self.size), Image.BILINEAR)
            xs.append(self.transform(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)))
        logits = self.loaded.model(torch.stack(xs).to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu()

    def _prepare(self, path: Path) -> tuple[_Pending, list[Image.Image]]:
        try:
            image, notes = read_rgb(path)
        except FileNotFoundError:
            return _Pending(path, None, [], status="error", error="file not found"), []
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return _Pending(path, None, [], status="error",
                            error=f"cannot read image: {exc}"), []
        item = _Pending(path, image, notes)
        if self.detector is None:
            item.faces.append(((0, 0, image.width, image.height), None, None))
            return item, [image]
        rgb = np.asarray(image)
        crops = []
        for box, score in self.detector.detect(rgb):
            angle = self.detector.eye_angle(rgb, box) if self.align else None
            item.faces.append((box, score, angle))
            crops.append(square_crop(image, box, self.margin, angle))
        if not crops:
            item.status = "no_face"
        return item, crops

    def _records(self, item: _Pending, probs: torch.Tensor) -> list[dict[str, Any]]:
        base = {"file": str(item.path), "status": item.status}
        if item.status != "ok":
            msg = item.error or "no face detected"
            return [{**base, "face": None, "box": None, "label": None, "confidence": None,
                     "probabilities": None, "notes": item.notes, "message": msg}]
        out = []
        for i, (box, score, angle) in enumerate(item.faces):
            p = probs[item.first + i]
            k = int(p.argmax())
            rec = {**base, "face": i, "box": list(box), "label": self.classes[k],
                   "confidence": round(float(p[k]), 6),
                   "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p)},
                   "notes": item.notes, "message": ""}
            if score is not None:
                rec["detector_score"] = round(score, 3)
            if angle is not None:
                rec["roll_deg"] = round(angle, 2)
            out.append(rec)
        return out

    def _annotate(self, item: _Pending, records: list[dict[str, Any]]) -> None:
        if self.annotate_dir is None or item.image is None:
            return
        im = item.image.copy()
        draw = ImageDraw.Draw(im)
        lw = max(2, round(min(im.size) / 150))
        for rec in records:
            if rec["box"] is None:
                continue
            x, y, w, h = rec["box"]
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 40, 40), width=lw)
            text = f"{rec['label']} {100 * rec['confidence']:.0f}%"
            tx, ty = x + lw, max(0, y - 12 - lw) if y >= 12 + lw else y + lw
            bbox = draw.textbbox((tx, ty), text)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=(255, 255, 255))
        name = f"{item.path.stem}.png"
        n = 1
        while name in self._annotated:  # same stem from another folder
            n += 1
            name = f"{item.path.stem}_{n}.png"
        self._annotated.add(name)
        im.save(self.annotate_dir / name)

    def run(self, paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
        """Records in input order (one per face; one per file without faces or unreadable),
        classifying ``batch_size`` crops at a time."""
        pending: list[_Pending] = []
        crops: list[Image.Image] = []

        def flush() -> Iterator[dict[str, Any]]:
            probs = torch.cat([self._classify(crops[i:i + self.batch_size])
                               for i in range(0, len(crops), self.batch_size)]
                              or [torch.empty(0, len(self.classes))])
            for item in pending:
                recs = self._records(item, probs)
                self._annotate(item, recs)
                yield from recs
            pending.clear()
            crops.clear()

        for path in paths:
            item, new = self._prepare(Path(path))
            item.first = len(crops)
            pending.append(item)
            crops.extend(new)
            if len(crops) >= self.batch_size:
                yield from flush()
        yield from flush()


# --------------------------------------------------------------------------- output
CSV_FIXED = ["file", "status", "face", "x", "y", "w", "h", "label", "confidence"]


def _csv_row(r: dict[str, Any], classes: list[str]) -> list[Any]:
    box = r["box"] or [""] * 4
    probs = r["probabilities"] or {}
    return ([r["file"], r["status"], "" if r["face"] is None else r["face"], *box,
             r["label"] or "", "" if r["confidence"] is None else r["confidence"]]
            + [probs.get(c, "") for c in classes] + ["; ".join(r["notes"]), r["message"]])


def write_records(records: Iterable[dict[str, Any]], classes: list[str], fmt: str,
                  out: TextIO) -> None:
    """Write ``records`` as ``json`` (one array), ``jsonl`` (a line each) or ``csv``
    (``CSV_FIXED`` + one ``p_<class>`` column per class + ``notes`` + ``message``), each
    record as it arrives (the stream is flushed after each), so a long run can be followed
    and what was written survives an interruption."""
    if fmt not in ("json", "jsonl", "csv"):
        raise ValueError(f"--format must be json, jsonl or csv, got {fmt!r}")
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_FIXED + [f"p_{c}" for c in classes] + ["notes", "message"])
    elif fmt == "json":
        out.write("[")
    for n, rec in enumerate(records):
        if writer is not None:
            writer.writerow(_csv_row(rec, classes))
        elif fmt == "jsonl":
            out.write(json.dumps(rec) + "\n")
        else:
            out.write(("," if n else "") + "\n  " + json.dumps(rec, indent=2).replace("\n", "\n  "))
        out.flush()
    if fmt == "json":
        out.write("\n]\n")
