"""qcs.faces: the MTCNN detector on real photographs and drawn faces, alignment onto the
training template, and PCD heat maps from landmarks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from face_helpers import drawn_face, photos, place, similarity
from PIL import Image
from qcs.faces import (
    TEMPLATES,
    Detector,
    HaarDetector,
    align_face,
    apply_transform,
    estimate_template,
    landmark_heatmaps,
    rotate_image,
    template_for,
    umeyama,
)
from qcs.faces.mtcnn import MTCNN, load_networks, nms

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def detector():
    return Detector()


@pytest.fixture(scope="module")
def astronaut_face(detector):
    """The astronaut and its one face (upright)."""
    img = photos()["astronaut"]
    faces = detector.detect([img])[0]
    assert len(faces) == 1
    return img, faces[0]


def sane_layout(face) -> None:
    """Eyes apart and level-ish, nose between and below them, mouth below the nose, all
    inside the (slightly grown) box."""
    le, re, nose, lm, rm = face.landmarks
    roll = math.radians(face.roll())
    rot = np.array([[math.cos(roll), math.sin(roll)], [-math.sin(roll), math.cos(roll)]])
    le, re, nose, lm, rm = (rot @ p for p in face.landmarks)  # in the face's own frame
    eye_dist = re[0] - le[0]
    assert eye_dist > 0.25 * face.box[2]
    assert le[0] < nose[0] < re[0]
    assert nose[1] > max(le[1], re[1]) + 0.2 * eye_dist
    assert min(lm[1], rm[1]) > nose[1]
    assert lm[0] < rm[0]
    x, y, w, h = face.box
    grow = 0.25 * max(w, h)
    assert ((face.landmarks >= [x - grow, y - grow]) & (face.landmarks <= [x + w + grow,
                                                                          y + h + grow])).all()


# --------------------------------------------------------------------------- pieces
def test_weights_load_into_every_parameter():
    nets = load_networks()
    assert [sum(p.numel() for p in n.parameters()) for n in nets] == [6632, 100178, 389040]


def test_nms_matches_torchvision_and_min_mode_drops_nested_boxes():
    from torchvision.ops import nms as tv_nms
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores = torch.rand(200, generator=g)
    for t in (0.3, 0.5, 0.7):
        assert torch.equal(nms(boxes, scores, t), tv_nms(boxes, scores, t))
    outer, inner = [0.0, 0, 100, 100], [10.0, 10, 30, 30]  # IoU 0.04, inside the outer one
    b, s = torch.tensor([outer, inner]), torch.tensor([0.9, 0.8])
    assert nms(b, s, 0.5).tolist() == [0, 1]
    assert nms(b, s, 0.5, mode="min").tolist() == [0]
    with pytest.raises(ValueError, match="mode"):
        nms(b, s, 0.5, mode="max")


def test_umeyama_matches_scikit_image_and_recovers_an_exact_similarity():
    from skimage.transform import SimilarityTransform
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    m = similarity(33.0, 1.7, (12.0, -40.0))
    np.testing.assert_allclose(umeyama(src, apply_transform(m, src)), m, atol=1e-9)
    dst = apply_transform(m, src) + rng.normal(0, 2, (5, 2))
    ref = SimilarityTransform.from_estimate(src, dst) if hasattr(
        SimilarityTransform, "from_estimate") else SimilarityTransform()
    if not hasattr(SimilarityTransform, "from_estimate"):
        ref.estimate(src, dst)
    np.testing.assert_allclose(umeyama(src, dst), ref.params[:2], atol=1e-8)
    with pytest.raises(ValueError, match="coincide"):
        umeyama(np.ones((5, 2)), src)
    with pytest.raises(ValueError, match="same shape"):
        umeyama(src, src[:4])


def test_rotate_image_maps_points_back():
    img = np.zeros((60, 90, 3), np.uint8)
    img[20:24, 70:74] = 255  # a bright square centred at (72, 22)
    for angle in (25.0, -60.0, 90.0):
        rot, m = rotate_image(img, angle)
        ys, xs = np.nonzero(rot[..., 0] > 100)
        w = rot[ys, xs, 0].astype(float)
        q = np.array([(xs * w).sum() / w.sum() + 0.5, (ys * w).sum() / w.sum() + 0.5])
        np.testing.assert_allclose(apply_transform(m, q[None])[0], [72.0, 22.0], atol=0.6)


# --------------------------------------------------------------------------- photographs
def test_astronaut_upright_one_face_sane_landmarks(astronaut_face):
    _, face = astronaut_face
    sane_layout(face)
    assert face.angle == 0 and abs(face.roll()) < 10
    x, y, w, h = face.box
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 200  # her face, not the flag or suit


def test_astronaut_rotated_25_degrees_is_found_with_the_same_landmarks(detector, astronaut_face):
    img, upright = astronaut_face
    for angle in (25.0, -25.0):
        rot, m = rotate_image(img, angle)
        faces = detector.detect([rot])[0]
        assert len(faces) == 1
        sane_layout(faces[0])
        # the upright landmarks carried into the rotated copy (inverse of m)
        a = np.linalg.inv(m[:, :2])
        expected = (upright.landmarks - m[:, 2]) @ a.T
        err = np.linalg.norm(faces[0].landmarks - expected, axis=1)
        assert err.max() < 8, err  # the face is ~90 px wide
        assert abs(faces[0].roll() + angle) < 8


def test_astronaut_shrunk_and_mirrored_collage(detector, astronaut_face):
    img, upright = astronaut_face
    small = np.asarray(Image.fromarray(img).resize((128, 128), Image.LANCZOS))
    collage = np.concatenate([img, img[:, ::-1]], axis=1)
    small_faces, collage_faces = detector.detect([small, collage])
    assert len(small_faces) == 1
    sane_layout(small_faces[0])
    err = np.linalg.norm(small_faces[0].landmarks - upright.landmarks / 4, axis=1)
    assert err.max() < 3, err
    assert len(collage_faces) == 2
    halves = sorted(f.box[0] + f.box[2] / 2 > img.shape[1] for f in collage_faces)
    assert halves == [False, True]
    for f in collage_faces:
        sane_layout(f)


def test_no_face_on_the_coffee_cup_or_the_cat(detector):
    p = photos()
    assert detector.detect([p["coffee"], p["cat"]]) == [[], []]


@pytest.mark.slow
def test_batch_gives_the_same_faces_as_one_by_one(detector):
    face, pts = drawn_face(90, seed=3)
    imgs = [place(face, pts, similarity(a, 1.0, (70 + a, 60)), (260, 260))[0]
            for a in (0.0, 8.0)]
    imgs.append(imgs[0][:200])  # another size: a second P-Net group
    together = detector.detect(imgs)
    for img, faces in zip(imgs, together):
        alone = detector.detect([img])[0]
        assert len(alone) == len(faces) == 1
        np.testing.assert_allclose(alone[0].landmarks, faces[0].landmarks, atol=1e-3)


# --------------------------------------------------------------------------- drawn faces
def random_placements(n: int, seed: int):
    """Drawn faces rotated (+-40 degrees) and scaled (0.6-1.6) at random on a 320 px
    canvas: ``(image, true landmarks)``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        face, pts = drawn_face(100, seed=seed * 100 + i)
        m = similarity(rng.uniform(-40, 40), rng.uniform(0.6, 1.6), (0, 0))
        m[:, 2] = rng.uniform(140, 180, 2) - m[:, :2] @ [50, 65]
        yield place(face, pts, m, (320, 320))


@pytest.mark.slow
def test_drawn_faces_landmark_error(detector):
    nme = []
    for img, truth in random_placements(6, seed=1):
        faces = detector.detect([img])[0]
        assert len(faces) == 1
        err = np.linalg.norm(faces[0].landmarks - truth, axis=1)
        nme.append(err / np.linalg.norm(truth[1] - truth[0]))  # faces are 60-160 px wide
    nme = np.array(nme)
    # eyes are drawn as pupils (well defined); the nose tip and mouth corners less so
    assert nme[:, :2].mean() < 0.08 and nme.mean() < 0.15, nme.mean(0)


def test_alignment_puts_the_true_eyes_on_the_template(detector):
    tpl = TEMPLATES["raf-db"] * 100
    off_ideal, off_template = [], []
    for img, truth in random_placements(6, seed=2):
        faces = detector.detect([img])[0]
        crop, m = align_face(Image.fromarray(img), faces[0].landmarks, 100, "raf-db")
        assert crop.size == (100, 100)
        eyes = apply_transform(m, truth[:2])
        # where the true landmarks would put them (the drawn face is shorter than a human
        # one, so the five-point fit leaves its eyes a little below the template's)
        ideal = apply_transform(umeyama(truth, TEMPLATES["raf-db"] * 100), truth[:2])
        off_ideal.append(np.linalg.norm(eyes - ideal, axis=1))
        off_template.append(np.linalg.norm(eyes - tpl[:2], axis=1))
        # and the crop shows the face: the pupils (darkest blobs) sit at the eyes
        grey = np.asarray(crop.convert("L"), dtype=float)
        for ex, ey in eyes:
            x, y = int(ex), int(ey)
            assert grey[y - 1:y + 2, x - 1:x + 2].mean() < grey[y - 12:y + 13, x - 12:x + 13].mean()
    # 100 px crops; the nose and mouth points the fit also uses are the least accurate
    assert np.mean(off_ideal) < 2.5 and np.max(off_ideal) < 5, off_ideal
    assert np.mean(off_template) < 4 and np.max(off_template) < 6, off_template


def test_align_face_checks_its_input():
    img = Image.new("RGB", (50, 50))
    with pytest.raises(ValueError, match="landmarks"):
        align_face(img, np.zeros((3,)), 100)
    with pytest.raises(ValueError, match="template must be one of"):
        align_face(img, TEMPLATES["box"] * 50, 100, "nope")
    with pytest.raises(ValueError, match="size"):
        align_face(img, TEMPLATES["box"] * 50, 0)
    assert template_for("ferplus") is TEMPLATES["box"]
    assert template_for("raf-db") is TEMPLATES["raf-db"]


def test_estimate_template_recovers_the_layout_of_aligned_faces():
    rng = np.random.default_rng(0)
    truth = TEMPLATES["raf-db"]
    sets = [truth * 100 + rng.normal(0, 0.8, (5, 2)) for _ in range(200)]
    sets += [rng.uniform(0, 100, (5, 2)) for _ in range(5)]  # wild detections
    np.testing.assert_allclose(estimate_template(sets, 100), truth, atol=0.004)


# --------------------------------------------------------------------------- built-in data
def test_builtin_data_detected_eyes_are_where_they_were_drawn(tmp_path):
    from qcs.data.synth import SynthParams, generate
    root = generate(tmp_path, SynthParams(train_per_class=6, test_per_class=0, size=100))
    rows = [json.loads(s) for s in (root / "synth_factors.jsonl").read_text().splitlines()]
    imgs = [np.asarray(Image.open(root / "Image" / "aligned" / f"{r['name'][:-4]}_aligned.jpg"))
            for r in rows]
    found = Detector(angles=()).detect(imgs)
    hits = [(f[0], r) for f, r in zip(found, rows) if f]
    assert len(hits) >= 3  # drawn cartoons: MTCNN finds a part of them (see docs/faces.md)
    for face, row in hits:
        err = np.linalg.norm(face.landmarks[:2] / 100 - np.array(row["eyes"]), axis=1)
        assert err.max() < 0.06, err


# --------------------------------------------------------------------------- heat maps
def test_heatmaps_from_landmarks_match_the_builtin_maps():
    from qcs.data.landmarks import render_heatmaps
    eyes, mouth = np.array([[0.35, 0.41], [0.65, 0.41]]), np.array([0.5, 0.72])
    five = np.array([*eyes, [0.5, 0.58], mouth - [0.12, 0], mouth + [0.12, 0]]) * 64
    maps = landmark_heatmaps(five, 64)
    assert maps.shape == (64, 64, 3) and maps.dtype == np.uint8
    np.testing.assert_array_equal(maps, render_heatmaps([*map(tuple, eyes), tuple(mouth)], 64))
    for c, (x, y) in enumerate([*eyes, mouth]):
        iy, ix = np.unravel_index(maps[..., c].argmax(), (64, 64))
        assert abs(ix + 0.5 - x * 64) <= 0.5 and abs(iy + 0.5 - y * 64) <= 0.5
    with pytest.raises(ValueError, match="landmarks must be"):
        landmark_heatmaps(five[:3], 64)


# --------------------------------------------------------------------------- fallback
def test_haar_fallback_gives_boxes_without_landmarks(astronaut_face):
    pytest.importorskip("cv2")
    img, face = astronaut_face
    try:
        haar = HaarDetector()
    except ImportError as exc:  # an OpenCV without the cascade files
        pytest.skip(str(exc))
    faces = haar.detect([img])[0]
    assert len(faces) == 1 and faces[0].landmarks is None and faces[0].roll() is None
    hx, hy, hw, hh = faces[0].box
    assert hx < face.landmarks[:, 0].mean() < hx + hw and hy < face.landmarks[:, 1].mean() < hy + hh


def test_detector_arguments_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        Detector(threshold=1.5)
    with pytest.raises(ValueError, match="min_face"):
        MTCNN(min_face=5)
    with pytest.raises(ValueError, match=r"images\[0\] must be uint8"):
        MTCNN().detect([np.zeros((10, 10), np.uint8)])
