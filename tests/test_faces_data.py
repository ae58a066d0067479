"""Landmarks and PCD heat maps for real dataset layouts (RAF-DB's manual points,
AffectNet's 68-point column, the detector on a folder), on small layouts written here."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from face_helpers import drawn_face, photos
from PIL import Image
from qcs.data.landmarks import heatmap_path
from qcs.faces import TEMPLATES, Detector, align_face
from qcs.faces.annotations import (
    five_from_68,
    landmark_items,
    raf_aligned_points,
    read_raf_manual,
    write_landmark_maps,
)


def peaks(path, channels: int = 3) -> np.ndarray:
    """``[channels, 2]`` (x, y) fractions of each map's maximum."""
    maps = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    out = []
    for c in range(channels):
        iy, ix = np.unravel_index(maps[..., c].argmax(), maps.shape[:2])
        out.append([(ix + 0.5) / maps.shape[1], (iy + 0.5) / maps.shape[0]])
    return np.array(out)


def expected(five: np.ndarray) -> np.ndarray:
    """The three map centres (eyes, mouth centre) of five landmarks."""
    return np.array([five[0], five[1], (five[3] + five[4]) / 2])


def write_raf(tmp_path, n: int = 3, template=TEMPLATES["raf-db"]):
    """A RAF-DB ``basic`` tree: originals of drawn faces with their manual five points,
    and aligned 100 px images made by the five-point fit onto ``template``. Returns the
    tree and, by name, the five points in the original and in the aligned image."""
    base = tmp_path / "basic"
    for sub in ("Annotation/manual", "Image/original", "Image/aligned", "EmoLabel"):
        (base / sub).mkdir(parents=True)
    truths = {}
    for i in range(n):
        face, pts = drawn_face(120 + 20 * i, seed=i)
        name = f"train_{i + 1:05d}"
        face.save(base / "Image" / "original" / f"{name}.jpg", quality=95)
        lines = [f"{x:.2f} {y:.2f}" for x, y in pts] + ["0", "1", "2"]
        (base / "Annotation" / "manual" / f"{name}_manu_attri.txt").write_text("\n".join(lines))
        crop, m = align_face(face, pts, 100, template)
        crop.save(base / "Image" / "aligned" / f"{name}_aligned.jpg", quality=95)
        truths[name] = pts, pts @ m[:, :2].T + m[:, 2]
    return base, truths


def test_raf_manual_points_become_maps_of_the_aligned_and_original_images(tmp_path):
    base, truths = write_raf(tmp_path)
    manual = read_raf_manual(tmp_path)
    assert sorted(manual) == sorted(truths)
    for k in truths:
        np.testing.assert_allclose(manual[k], truths[k][0], atol=0.006)
    aligned = sorted((base / "Image" / "aligned").glob("*.jpg"))
    written, missing = write_landmark_maps(landmark_items(aligned, "raf-manual", base))
    assert written == 3 and missing == []
    for p in aligned:
        assert heatmap_path(p).parent == p.parent / "landmarks"
        where = truths[p.stem[:-len("_aligned")]][1]  # as the aligned image was made
        np.testing.assert_allclose(peaks(heatmap_path(p)), expected(where) / 100, atol=0.006)
    originals = sorted((base / "Image" / "original").glob("*.jpg"))
    write_landmark_maps(landmark_items(originals, "raf-manual", base))
    for p in originals:
        w, h = Image.open(p).size
        np.testing.assert_allclose(peaks(heatmap_path(p)),
                                   expected(truths[p.stem][0]) / [w, h], atol=0.006)
    with pytest.raises(FileNotFoundError, match="manual"):
        read_raf_manual(tmp_path / "elsewhere")


def test_raf_manual_with_the_detector_measures_an_unknown_template(tmp_path):
    # aligned images made with a template the defaults do not know: lower eyes, and a
    # narrower face
    other = TEMPLATES["raf-db"] * [0.9, 1.0] + [0.05, 0.04]
    base, truths = write_raf(tmp_path, n=12, template=other)
    aligned = sorted((base / "Image" / "aligned").glob("*.jpg"))
    det = Detector(angles=(), threshold=0.8)  # drawn faces score lower than photographs
    written, missing = write_landmark_maps(landmark_items(aligned, "raf-manual", base,
                                                          detector=det))
    assert written == 12 and missing == []
    for p in aligned:
        where = truths[p.stem[:-len("_aligned")]][1]
        np.testing.assert_allclose(peaks(heatmap_path(p)), expected(where) / 100, atol=0.021)
    # the default template would have put them elsewhere
    assert np.abs(raf_aligned_points(truths["train_00001"][0], 100) - truths["train_00001"][1]
                  ).max() > 3


def test_affectnet_landmark_column(tmp_path):
    rng = np.random.default_rng(0)
    p68 = rng.uniform(10, 20, (68, 2))
    p68[36:42] += [30, 40]   # the image-left eye contour around (45, 55)
    p68[42:48] += [70, 40]
    p68[30], p68[48], p68[54] = [60, 75], [45, 95], [80, 95]
    five = five_from_68(p68)
    np.testing.assert_allclose(five[0], p68[36:42].mean(0))
    np.testing.assert_allclose(five[2:], [[60, 75], [45, 95], [80, 95]])
    imgs = tmp_path / "Manually_Annotated_Images" / "12"
    imgs.mkdir(parents=True)
    Image.new("RGB", (128, 128), (90, 90, 90)).save(imgs / "a.jpg")
    Image.new("RGB", (128, 128), (90, 90, 90)).save(imgs / "b.jpg")
    lists = tmp_path / "training.csv"
    with lists.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"])
        w.writerow(["12/a.jpg", 0, 0, 128, 128, ";".join(f"{v:.3f}" for v in p68.ravel()),
                    1, 0.5, 0.2])
        w.writerow(["12/b.jpg", 0, 0, 128, 128, "", 1, 0.5, 0.2])
    paths = [imgs / "a.jpg", imgs / "b.jpg"]
    written, missing = write_landmark_maps(landmark_items(paths, "affectnet", tmp_path,
                                                          list_file=lists))
    assert written == 1 and missing == [imgs / "b.jpg"]
    np.testing.assert_allclose(peaks(heatmap_path(paths[0])), expected(five) / 128, atol=0.006)
    with pytest.raises(ValueError, match="68"):
        five_from_68(p68[:5])


def test_detector_source_on_a_folder(tmp_path):
    p = photos()
    Image.fromarray(p["astronaut"]).save(tmp_path / "astronaut.png")
    Image.fromarray(p["coffee"]).save(tmp_path / "coffee.png")
    paths = [tmp_path / "astronaut.png", tmp_path / "coffee.png"]
    det = Detector(angles=())
    written, missing = write_landmark_maps(landmark_items(paths, "detect", detector=det))
    assert written == 1 and missing == [tmp_path / "coffee.png"]
    face = det.detect([p["astronaut"]])[0][0]
    np.testing.assert_allclose(peaks(heatmap_path(paths[0])), expected(face.landmarks) / 512,
                               atol=0.006)
    with pytest.raises(ValueError, match="source must be"):
        list(landmark_items(paths, "nope"))


def test_training_reader_applies_exif_orientation_like_predict(tmp_path):
    from qcs.data.datasets import read_image
    from qcs.predict import read_rgb
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :20] = 255                      # a white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                            # display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    shown = np.asarray(read_image(path))
    assert shown.shape == (60, 40, 3)
    # clockwise: the stored top-left block is now at the top-right
    assert shown[:20, -10:].mean() > 200 and shown[-20:, :10].mean() < 50
    np.testing.assert_array_equal(shown, np.asarray(read_rgb(path)[0]))


def test_data_landmarks_command(tmp_path, capsys):
    from qcs.cli import main
    base, truths = write_raf(tmp_path / "raf")
    (base / "EmoLabel" / "list_patition_label.txt").write_text(
        "".join(f"{name}.jpg 4\n" for name in truths))
    assert main(["data", "landmarks", "--data", "raf-db", "--data-root", str(base),
                 "--source", "raf-manual", "--split", "train", "--quiet"]) == 0
    assert "3 maps written, 0 without landmarks" in capsys.readouterr().out
    for name, (_, where) in truths.items():
        maps = heatmap_path(base / "Image" / "aligned" / f"{name}_aligned.jpg")
        np.testing.assert_allclose(peaks(maps), expected(where) / 100, atol=0.006)
    # any folder, by the detector
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photos()["astronaut"]).resize((200, 200)).save(folder / "a.png")
    Image.new("RGB", (120, 120), (20, 60, 90)).save(folder / "flat.png")
    assert main(["data", "landmarks", "--data-root", str(folder), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 images, 1 maps written, 1 without landmarks" in out and "flat.png" in out
    assert heatmap_path(folder / "a.png").is_file()
    # running again skips the drawn map and does not read it as an image
    assert main(["data", "landmarks", "--data-root", str(folder), "--quiet"]) == 0
    assert "2 images, 0 maps written" in capsys.readouterr().out
    assert main(["data", "landmarks", "--data", "folder", "--data-root", str(folder),
                 "--source", "raf-manual"]) == 2
    assert "--source raf-manual needs --data raf-db" in capsys.readouterr().err
