"""Faces in photographs: a five-landmark detector (MTCNN, weights shipped with the
package), alignment onto the training data's layout, and PCD's landmark heat maps.

>>> from qcs.faces import Detector, align_face
>>> faces = Detector().detect([rgb])[0]            # rgb: uint8 [H, W, 3]
>>> crop, m = align_face(image, faces[0].landmarks, 100, "raf-db")
"""

from .align import (
    LAYOUT_TEMPLATES,
    TEMPLATES,
    align_face,
    apply_transform,
    estimate_template,
    template_for,
    umeyama,
)
from .detect import Detector, Face, HaarDetector, make_detector, rotate_image
from .maps import landmark_heatmaps, pcd_points
from .mtcnn import MTCNN

__all__ = [
    "LAYOUT_TEMPLATES",
    "MTCNN",
    "TEMPLATES",
    "Detector",
    "Face",
    "HaarDetector",
    "align_face",
    "apply_transform",
    "estimate_template",
    "landmark_heatmaps",
    "make_detector",
    "pcd_points",
    "rotate_image",
    "template_for",
    "umeyama",
]
