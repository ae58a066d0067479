"""Face records from images: the MTCNN cascade with a search over in-plane rotations, or
OpenCV's Haar cascade (boxes only) where OpenCV is installed.

:class:`Detector` ``.detect(images) -> [[Face, ...], ...]``; every :class:`Face` is in the
pixels of the image it came from, whatever rotated copy found it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .mtcnn import MTCNN, nms

__all__ = ["Detector", "Face", "HaarDetector", "make_detector", "rotate_image"]


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: ``(x, y, w, h)`` axis-aligned, in input-image pixels.
        score: the detector's confidence (MTCNN: O-Net's face probability); ``None``
            for a face that was given, not detected.
        landmarks: ``[5, 2]`` float ``[x, y]`` points in input-image pixels: left eye,
            right eye, nose tip, left and right mouth corner (left / right as seen in the
            image); ``None`` for detectors without landmarks.
        angle: rotation (degrees) of the image copy the face was found in; 0 upright.
    """

    box: tuple[float, float, float, float]
    score: float | None
    landmarks: np.ndarray | None = None
    angle: float = 0.0

    def roll(self) -> float | None:
        """Angle of the eye line in degrees (positive: the right eye of the image is
        lower); ``None`` without landmarks."""
        if self.landmarks is None:
            return None
        (x1, y1), (x2, y2) = self.landmarks[0], self.landmarks[1]
        return math.degrees(math.atan2(y2 - y1, x2 - x1))


def rotate_image(rgb: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` rotated by ``angle`` degrees (counter-clockwise on screen) on a canvas large
    enough to hold all of it (black outside), and the ``2x3`` matrix that maps a point of
    the rotated copy back to the input: ``p = M[:, :2] @ q + M[:, 2]``."""
    h, w = rgb.shape[:2]
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    nw = math.ceil(abs(w * c) + abs(h * s) - 1e-6)
    nh = math.ceil(abs(w * s) + abs(h * c) - 1e-6)
    # on screen (y down) a counter-clockwise turn of the picture maps input p to
    # q = R(-t) (p - c_in) + c_out, so q -> p is p = R(t) (q - c_out) + c_in
    a = np.array([[c, -s], [s, c]])
    offset = np.array([w / 2, h / 2]) - a @ np.array([nw / 2, nh / 2])
    m = np.concatenate([a, offset[:, None]], axis=1)
    out = Image.fromarray(rgb).transform((nw, nh), Image.AFFINE, data=tuple(m.ravel()),
                                         resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out), m


def _map_face(box: np.ndarray, score: float, points: np.ndarray, m: np.ndarray, angle: float
              ) -> Face:
    """A detection in a rotated copy (box ``x1 y1 x2 y2``) mapped back through ``m``."""
    corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]])
    corners = corners @ m[:, :2].T + m[:, 2]
    # the rotated square's axis-aligned hull overstates the face: keep its centre and the
    # detection's own side
    centre, side = corners.mean(0), box[2] - box[0]
    return Face((float(centre[0] - side / 2), float(centre[1] - side / 2), float(side),
                 float(box[3] - box[1])), float(score), points @ m[:, :2].T + m[:, 2], angle)


class Detector:
    """MTCNN faces with five landmarks; images where no face is found upright are searched
    again in copies rotated by each of ``angles`` (degrees), and the faces found there are
    mapped back to the input's pixels (overlapping finds are merged).

    Args:
        device: where the networks run (the classifier's device).
        angles: rotations tried when the upright image has no face; ``()`` turns it off.
        min_face: the smallest face side searched, in pixels...
        min_face_fraction: ... and as a fraction of the image's shorter side.
        threshold: O-Net face probability needed to report a face.
    """

    def __init__(self, device: str | torch.device = "cpu",
                 angles: tuple[float, ...] = (-30.0, 30.0, -60.0, 60.0),
                 min_face: float = 20.0, min_face_fraction: float = 0.05,
                 threshold: float = 0.95) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.net = MTCNN(device, min_face=min_face, min_face_fraction=min_face_fraction,
                         thresholds=(0.6, 0.7, threshold))
        self.angles = tuple(float(a) for a in angles)
        self.landmarks = True

    def _upright(self, images: list[np.ndarray]) -> list[list[Face]]:
        out = []
        for boxes, scores, points in self.net.detect(images):
            out.append([Face((float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])),
                             float(s), p) for b, s, p in zip(boxes, scores, points)])
        return out

    def _rotated(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces of each image found in its rotated copies (all copies of all images in
        one detector call), mapped back and merged."""
        copies = [(k, a, *rotate_image(rgb, a)) for k, rgb in enumerate(images)
                  for a in self.angles]
        found: list[list[Face]] = [[] for _ in images]
        for (k, a, _, m), (boxes, scores, points) in zip(
                copies, self.net.detect([c for _, _, c, _ in copies])):
            found[k] += [_map_face(b, s, p, m, a) for b, s, p in zip(boxes, scores, points)]
        return [self._merge(faces) for faces in found]

    @staticmethod
    def _merge(faces: list[Face]) -> list[Face]:
        """One face per place: the best of finds covering each other by half or more."""
        if len(faces) < 2:
            return faces
        xyxy = torch.tensor([[f.box[0], f.box[1], f.box[0] + f.box[2], f.box[1] + f.box[3]]
                             for f in faces])
        keep = nms(xyxy, torch.tensor([f.score for f in faces]), 0.5, mode="min")
        return [faces[i] for i in keep.tolist()]

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces of each RGB ``uint8 [H, W, 3]`` image, best score first."""
        out = self._upright(images)
        missing = [i for i, faces in enumerate(out) if not faces]
        if missing and self.angles:
            for i, faces in zip(missing, self._rotated([images[i] for i in missing])):
                out[i] = faces
        return out


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (boxes, no landmarks): the fallback where the
    ``opencv-python-headless`` 4.x wheel, which bundles the cascade files, is installed.

    Overlapping boxes (one covering more than ``overlap`` of the smaller) are merged,
    keeping the higher cascade score."""

    def __init__(self, min_neighbors: int = 5, scale_factor: float = 1.1,
                 min_size: float = 0.06, overlap: float = 0.5) -> None:
        try:
            import cv2
        except ImportError:
            raise ImportError("the Haar detector needs OpenCV: pip install "
                              "'opencv-python-headless<5'") from None
        face_file = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or "") \
            / "haarcascade_frontalface_default.xml"
        if not face_file.is_file():
            raise ImportError(f"OpenCV {cv2.__version__} does not ship the Haar cascade "
                              f"files (looked for {face_file}); install "
                              "'opencv-python-headless<5'")
        self.cv2, self.cascade = cv2, cv2.CascadeClassifier(str(face_file))
        self.min_neighbors, self.scale_factor = min_neighbors, scale_factor
        self.min_size, self.overlap = min_size, overlap
        self.landmarks = False

    def _one(self, rgb: np.ndarray) -> list[Face]:
        grey = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)
        side = max(24, int(self.min_size * min(grey.shape)))
        boxes, _, weights = self.cascade.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(side, side), outputRejectLevels=True)
        if len(boxes) == 0:
            return []
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float64)
        scores = torch.as_tensor(np.ravel(weights), dtype=torch.float64)
        keep = nms(xyxy, scores, self.overlap, mode="min").tolist()
        return [Face(tuple(float(v) for v in boxes[i]), float(scores[i])) for i in keep]

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces of each RGB ``uint8 [H, W, 3]`` image, best score first."""
        return [self._one(im) for im in images]


def make_detector(name: str = "mtcnn", device: str | torch.device = "cpu"
                  ) -> Detector | HaarDetector:
    """``mtcnn`` (five landmarks, shipped weights) or ``haar`` (OpenCV, boxes only)."""
    if name == "mtcnn":
        return Detector(device)
    if name == "haar":
        return HaarDetector()
    raise ValueError(f"detector must be 'mtcnn' or 'haar', got {name!r}")
