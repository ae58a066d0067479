"""``qcs predict``: facial-expression labels for the faces in image files.

Pipeline: read (any PIL mode, EXIF orientation applied; grey-scale, palette, 16-bit and
RGBA inputs are converted to RGB and the conversion is noted in the file's record), detect
faces with five landmarks (:mod:`qcs.faces`, a batch of images per call), warp each face
onto the training data's five-point template at the checkpoint's ``data.image_size``
(``align=False``: a square box crop with a margin), and classify in batches. Networks that
read landmark heat maps (PCD with ``pcd.landmarks = "heatmap"``) get the maps drawn from
the detected landmarks.

The default detector (MTCNN) ships its weights inside the package: no download, no
OpenCV. OpenCV's Haar cascade (boxes only, no alignment) remains available as
``detector="haar"`` where ``opencv-python-headless<5`` is installed.

Every input yields records, never an exception: ``status`` is ``ok`` (one record per face),
``no_face`` or ``error`` (missing / unreadable file, with the reason).
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .data.datasets import IMAGE_SUFFIXES
from .data.landmarks import HeatmapTransform
from .errors import MissingDependency, UsageError
from .faces import (
    Face,
    align_face,
    apply_transform,
    landmark_heatmaps,
    make_detector,
    template_for,
)
from .inference import LoadedModel
from .tta import predict_logits

__all__ = [
    "CSV_FIXED",
    "Predictor",
    "box_crop_points",
    "collect_inputs",
    "make_face_detector",
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
def make_face_detector(name: str, device: str | torch.device = "cpu"):
    """``mtcnn`` (five landmarks; weights ship with the package) or ``haar`` (OpenCV's
    cascade, boxes only; needs ``opencv-python-headless<5``), as a :class:`UsageError` /
    :class:`MissingDependency` for the command line when it cannot be built."""
    if name not in ("mtcnn", "haar"):
        raise UsageError(f"--detector must be mtcnn or haar, got {name!r}")
    try:
        return make_detector(name, device)
    except ImportError as exc:
        raise MissingDependency(f"{exc}; or use the default --detector mtcnn") from None


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


def box_crop_points(box: Box, margin: float, points: np.ndarray, size: int) -> np.ndarray:
    """``points`` (image pixels) in the ``size``-pixel resize of ``square_crop(box,
    margin)`` (no rotation)."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    left, top = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    right = round(x + w / 2 + side / 2)
    return (np.asarray(points, dtype=np.float64) - [left, top]) * size / max(1, right - left)


# --------------------------------------------------------------------------- prediction
@dataclass
class _Pending:
    path: Path
    image: Image.Image | None
    notes: list[str]
    faces: list[Face] = field(default_factory=list)
    first: int = 0              # index of this file's first crop in the batch buffer
    status: str = "ok"
    error: str = ""


class Predictor:
    """Detect, align, crop and classify.

    Args:
        loaded: the checkpoint's network (:func:`qcs.inference.load_model`).
        detect: run face detection (``False``: each image is one face crop).
        margin: box-crop margin on each side, as a fraction of the detected box (used
            with ``align=False`` or a detector without landmarks).
        batch_size: images per detector call and crops per forward pass.
        annotate_dir: write each image with its boxes, landmarks and labels drawn there.
        align: warp each face's five landmarks onto the training data's template
            (``False``: the square box crop).
        device: where the detector and the network run.
        detector: ``"mtcnn"``, ``"haar"`` or a ready detector (``.detect(list of RGB
            arrays) -> lists of`` :class:`qcs.faces.Face`).
        template: alignment template name (default: the checkpoint's data layout's).
        flip_tta: average the logits of each crop and of its mirror image.
    """

    def __init__(self, loaded: LoadedModel, *, detect: bool = True, margin: float = 0.2,
                 batch_size: int = 32, annotate_dir: str | Path | None = None,
                 align: bool = True, device: str | torch.device = "cpu",
                 detector: str | Any = "mtcnn", template: str | None = None,
                 flip_tta: bool = False) -> None:
        if margin < 0:
            raise UsageError(f"--margin must be >= 0, got {margin}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        refusal = loaded.family.input_error(loaded.channels, loaded.base)
        if refusal is not None:  # inputs other than RGB (+ landmark heat maps we can draw)
            raise refusal
        self.loaded, self.classes = loaded, loaded.classes
        self.size = loaded.image_size
        self.maps = loaded.channels - 3  # landmark heat-map channels (heat-map PCD)
        self.transform = HeatmapTransform(train=False) if self.maps else loaded.transform()
        if flip_tta and self.maps:
            raise UsageError("--flip-tta: not available for heat-map networks (their left and "
                             "right landmark channels would need swapping)")
        self.flip_tta = flip_tta
        self.margin, self.batch_size, self.device = margin, batch_size, torch.device(device)
        self.detect, self.align = detect, align
        self.detector = None
        if detect or self.maps:
            self.detector = (make_face_detector(detector, device) if isinstance(detector, str)
                             else detector)
        if self.maps and not getattr(self.detector, "landmarks", False):
            raise UsageError(f"{loaded.base}: this network reads landmark heat maps, which "
                             "are drawn from the detected landmarks: use --detector mtcnn")
        self.template = template_for(template or loaded.data_format)
        self.annotate_dir = Path(annotate_dir) if annotate_dir else None
        if self.annotate_dir is not None:
            self.annotate_dir.mkdir(parents=True, exist_ok=True)
        self._annotated: set[str] = set()

    @torch.no_grad()
    def _classify(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """uint8 crops ``[3 (+ maps), S, S]`` -> probabilities ``[n, K]`` (float32, CPU)."""
        if not crops:
            return torch.empty(0, len(self.classes))
        x = torch.stack([self.transform(c) for c in crops]).to(self.device)
        logits = predict_logits(self.loaded.model, x, self.flip_tta)
        return torch.softmax(logits.float(), dim=1).cpu()

    def _tensor(self, crop: Image.Image, points: np.ndarray | None) -> torch.Tensor:
        """A ``size``-pixel crop (+ the heat maps of ``points``, crop pixels) as uint8."""
        if crop.size != (self.size, self.size):
            crop = crop.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)
        if not self.maps:
            return x
        maps = landmark_heatmaps(points, self.size)
        if self.maps == 1:
            maps = np.asarray(Image.fromarray(maps).convert("L"))[..., None]
        return torch.cat([x, torch.from_numpy(maps[..., :self.maps].copy()).permute(2, 0, 1)])

    def _face_input(self, image: Image.Image, face: Face) -> torch.Tensor:
        """The network input of one detected face: aligned onto the template when it has
        landmarks and ``align`` is on, else the square box crop."""
        if self.align and face.landmarks is not None:
            crop, m = align_face(image, face.landmarks, self.size, self.template)
            return self._tensor(crop, apply_transform(m, face.landmarks))
        box = tuple(round(v) for v in face.box)
        pts = (None if face.landmarks is None
               else box_crop_points(box, self.margin, face.landmarks, self.size))
        return self._tensor(square_crop(image, box, self.margin), pts)

    def _whole_image(self, item: _Pending, faces: list[Face] | None) -> list[torch.Tensor]:
        """``--no-detect``: the image is the face crop; a heat-map network still needs
        the landmarks of the face in it."""
        im = item.image
        face = Face((0.0, 0.0, float(im.width), float(im.height)), None)
        if self.maps:
            if not faces:
                item.status, item.error = "no_face", "no face landmarks found for the heat maps"
                return []
            face.landmarks = faces[0].landmarks
        item.faces.append(face)
        pts = None if face.landmarks is None else face.landmarks * [self.size / im.width,
                                                                   self.size / im.height]
        return [self._tensor(im, pts)]

    def _detect(self, images: list[Image.Image]) -> list[list[Face]]:
        """Faces of each image. Images given as face crops (``detect=False``) are framed
        in a black border first: a face that fills its picture is not found without one."""
        if self.detect:
            return self.detector.detect([np.asarray(im) for im in images])
        pads = [round(0.25 * max(im.size)) for im in images]
        framed = [np.pad(np.asarray(im), ((p, p), (p, p), (0, 0))) for im, p in zip(images, pads)]
        found = self.detector.detect(framed)
        for faces, p in zip(found, pads):
            for f in faces:
                f.landmarks = None if f.landmarks is None else f.landmarks - p
        return found

    def _read(self, path: Path) -> _Pending:
        try:
            image, notes = read_rgb(path)
        except FileNotFoundError:
            return _Pending(path, None, [], status="error", error="file not found")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return _Pending(path, None, [], status="error", error=f"cannot read image: {exc}")
        return _Pending(path, image, notes)

    def _prepare(self, paths: list[Path]) -> tuple[list[_Pending], list[torch.Tensor]]:
        """Read ``paths``, detect their faces in one call and build the network inputs."""
        items = [self._read(p) for p in paths]
        readable = [it for it in items if it.image is not None]
        found = (self._detect([it.image for it in readable])
                 if self.detector is not None and readable else [None] * len(readable))
        crops: list[torch.Tensor] = []
        for item, faces in zip(readable, found):
            item.first = len(crops)
            if not self.detect:
                crops += self._whole_image(item, faces)
                continue
            item.faces = list(faces)
            crops += [self._face_input(item.image, f) for f in item.faces]
            if not item.faces:
                item.status = "no_face"
        return items, crops

    def _records(self, item: _Pending, probs: torch.Tensor) -> list[dict[str, Any]]:
        base = {"file": str(item.path), "status": item.status}
        if item.status != "ok":
            msg = item.error or "no face detected"
            return [{**base, "face": None, "box": None, "label": None, "confidence": None,
                     "probabilities": None, "landmarks": None, "notes": item.notes,
                     "message": msg}]
        out = []
        for i, face in enumerate(item.faces):
            p = probs[item.first + i]
            k = int(p.argmax())
            rec = {**base, "face": i, "box": [round(v) for v in face.box],
                   "label": self.classes[k], "confidence": round(float(p[k]), 6),
                   "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p)},
                   "landmarks": (None if face.landmarks is None else
                                 [[round(float(x), 1), round(float(y), 1)]
                                  for x, y in face.landmarks]),
                   "notes": item.notes, "message": ""}
            if face.score is not None:
                rec["detector_score"] = round(face.score, 3)
            if face.roll() is not None:
                rec["roll_deg"] = round(face.roll(), 2)
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
            for px, py in rec["landmarks"] or []:
                draw.ellipse([px - lw, py - lw, px + lw, py + lw], fill=(40, 255, 40))
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
        ``batch_size`` images per detector call and crops per forward pass."""
        paths = [Path(p) for p in paths]
        for start in range(0, len(paths), self.batch_size):
            items, crops = self._prepare(paths[start:start + self.batch_size])
            probs = torch.cat([self._classify(crops[i:i + self.batch_size])
                               for i in range(0, len(crops), self.batch_size)]
                              or [torch.empty(0, len(self.classes))])
            for item in items:
                recs = self._records(item, probs)
                self._annotate(item, recs)
                yield from recs


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
