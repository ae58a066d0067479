"""qcs predict: input collection, image modes, face detection on drawn faces, crops,
batched classification against the model called directly, output formats, error paths."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from qcs.cli import main
from qcs.data import transforms
from qcs.inference import load_model
from qcs.predict import CSV_FIXED, Predictor, collect_inputs, read_rgb, square_crop
from use_helpers import CLASSES, draw_face, face_centre, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("predict_ckpt"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """two.jpg (two faces), sub/grey.png (L), sub/rgba.png, blank.png (no face),
    broken.jpg (not an image), notes.txt (ignored when walking the folder)."""
    root = tmp_path_factory.mktemp("predict_images")
    (root / "sub").mkdir()
    two = Image.new("L", (400, 220), 90)
    two.paste(draw_face(120), (20, 30))
    two.paste(draw_face(100), (250, 50))
    two.convert("RGB").save(root / "two.jpg", quality=95)
    grey = Image.new("L", (300, 300), 90)
    grey.paste(draw_face(150), (70, 50))
    grey.save(root / "sub" / "grey.png")
    rgba = grey.convert("RGBA")
    rgba.save(root / "sub" / "rgba.png")
    Image.new("RGB", (200, 200), (30, 120, 200)).save(root / "blank.png")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_collect_inputs_files_dirs_globs(images, tmp_path):
    paths, problems = collect_inputs([str(images / "two.jpg"), str(images),
                                      str(images / "**" / "*.png"), str(tmp_path / "nope.jpg"),
                                      str(tmp_path / "*.gif")])
    names = [p.name for p in paths]
    assert names[0] == "two.jpg"                       # argument order kept
    assert sorted(names) == sorted(["two.jpg", "blank.png", "broken.jpg", "grey.png",
                                    "rgba.png"])       # recursive, deduplicated, no .txt
    assert [why for _, why in problems] == ["no such file or directory",
                                            "pattern matches no image files"]


def test_read_rgb_converts_every_mode_and_says_so(tmp_path):
    cases = {
        "grey.png": (Image.new("L", (8, 6), 77), "grey-scale"),
        "rgba.png": (Image.new("RGBA", (8, 6), (200, 0, 0, 0)), "alpha composited"),
        "pal.png": (Image.new("P", (8, 6), 3), "palette"),
        "deep.png": (Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000),
                     "rescaled"),
    }
    for name, (im, note) in cases.items():
        im.save(tmp_path / name)
        rgb, notes = read_rgb(tmp_path / name)
        assert rgb.mode == "RGB" and rgb.size == (8, 6), name
        assert any(note in n for n in notes), (name, notes)
    rgba, _ = read_rgb(tmp_path / "rgba.png")
    assert np.asarray(rgba)[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    deep, _ = read_rgb(tmp_path / "deep.png")
    assert np.asarray(deep)[..., 0].min() == 0 and np.asarray(deep)[..., 0].max() == 255


def test_square_crop_geometry():
    im = Image.new("RGB", (100, 80), (255, 255, 255))
    crop = square_crop(im, (40, 30, 20, 10), margin=0.5)   # side = 20 * 2 = 40
    assert crop.size == (40, 40)
    edge = square_crop(im, (0, 0, 20, 20), margin=0.5)     # half outside: black
    a = np.asarray(edge)
    assert edge.size == (40, 40) and a[0, 0].sum() == 0 and a[-1, -1].sum() == 765


def test_detector_finds_each_drawn_face_once(images):
    pytest.importorskip("cv2")
    from qcs.predict import FaceDetector
    det = FaceDetector()
    rgb = np.asarray(Image.open(images / "two.jpg").convert("RGB"))
    found = det.detect(rgb)
    assert len(found) == 2
    for size, at in ((120, (20, 30)), (100, (250, 50))):
        cx, cy = face_centre(size, at)
        hits = [b for b, _ in found if b[0] < cx < b[0] + b[2] and b[1] < cy < b[1] + b[3]]
        assert len(hits) == 1, (size, found)
        assert 0.5 * size < hits[0][2] < 1.3 * size      # about the face's width
    assert det.detect(np.full((200, 200, 3), 128, np.uint8)) == []


def test_predict_cli_json_with_detection_annotation_and_errors(ckpt, images, tmp_path, capsys):
    pytest.importorskip("cv2")
    ann = tmp_path / "ann"
    rc = main(["predict", "--checkpoint", str(ckpt), str(images), str(tmp_path / "missing.jpg"),
               "--annotate", str(ann), "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 1                                        # some inputs could not be read
    records = json.loads(captured.out)
    by_file: dict[str, list] = {}
    for r in records:
        by_file.setdefault(r["file"].replace("\\", "/").rsplit("/", 1)[-1], []).append(r)
    assert [r["status"] for r in by_file["two.jpg"]] == ["ok", "ok"]
    assert by_file["blank.png"][0]["status"] == "no_face"
    assert by_file["broken.jpg"][0]["status"] == "error"
    assert "cannot read image" in by_file["broken.jpg"][0]["message"]
    assert by_file["missing.jpg"][0]["message"] == "no such file or directory"
    assert "grey-scale" in by_file["grey.png"][0]["notes"][0]
    assert "alpha" in by_file["rgba.png"][0]["notes"][0]
    for r in records:
        if r["status"] == "ok":
            assert list(r["probabilities"]) == CLASSES     # names from the checkpoint
            assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)
            assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
            assert len(r["box"]) == 4
    # the RGBA file is the grey one with an opaque alpha: same face, same result
    assert by_file["rgba.png"][0]["box"] == by_file["grey.png"][0]["box"]
    assert "2 unreadable" in captured.err and "missing.jpg" in captured.err
    written = sorted(p.name for p in ann.iterdir())
    assert written == ["blank.png", "grey.png", "rgba.png", "two.png"]
    assert Image.open(ann / "two.png").size == (400, 220)


def test_no_detect_csv_matches_the_model_called_directly(ckpt, tmp_path):
    gen = np.random.default_rng(0)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(5):
        Image.fromarray(gen.integers(0, 255, (40 + i, 40 + i, 3), dtype=np.uint8)).save(
            crops / f"c{i}.png")
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(ckpt), "--no-detect", str(crops), "-o", str(out),
               "--batch-size", "2"])
    assert rc == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == CSV_FIXED + [f"p_{c}" for c in CLASSES] + ["notes", "message"]
    assert len(rows) == 6
    loaded = load_model(ckpt)
    tf = transforms.test_transform(loaded.image_size)
    for row in rows[1:]:
        im = Image.open(row[0]).convert("RGB")
        assert row[1] == "ok" and row[3:7] == ["0", "0", str(im.width), str(im.height)]
        x = torch.from_numpy(np.asarray(im.resize((32, 32), Image.BILINEAR)).copy())
        with torch.no_grad():
            p = torch.softmax(loaded.model(tf(x.permute(2, 0, 1))[None]), 1)[0]
        got = torch.tensor([float(v) for v in row[9:16]])
        torch.testing.assert_close(got, p, atol=2e-6, rtol=0)
        assert row[7] == CLASSES[int(p.argmax())]


def test_batch_size_does_not_change_results(ckpt, images):
    pytest.importorskip("cv2")
    loaded = load_model(ckpt)
    paths, _ = collect_inputs([str(images)])
    one = list(Predictor(loaded, batch_size=1).run(paths))
    many = list(Predictor(loaded, batch_size=64).run(paths))
    assert [r["file"] for r in one] == [r["file"] for r in many]
    for a, b in zip(one, many):
        assert a["status"] == b["status"] and a["box"] == b["box"]
        if a["probabilities"]:
            for c in CLASSES:
                assert a["probabilities"][c] == pytest.approx(b["probabilities"][c], abs=1e-5)


def test_predict_usage_errors(ckpt, tmp_path, capsys, monkeypatch):
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "none.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    assert main(["predict", "--checkpoint", str(tmp_path / "nockpt"), str(img)]) == 2
    assert "nockpt.json" in capsys.readouterr().err       # names the missing file
    assert main(["predict", "--checkpoint", str(ckpt), str(img), "--margin", "-1",
                 "--no-detect"]) == 2
    assert "--margin" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "cv2", None)        # OpenCV not installed
    assert main(["predict", "--checkpoint", str(ckpt), str(img)]) == 2
    err = capsys.readouterr().err
    assert "qcs-ext[predict]" in err and "--no-detect" in err
    assert main(["predict", "--checkpoint", str(ckpt), str(img), "--no-detect"]) == 0


def test_detector_tolerates_tilt_and_crop_levels_the_eye_line():
    pytest.importorskip("cv2")
    from qcs.predict import FaceDetector
    det = FaceDetector()
    for angle in (-10, 10):
        g = Image.new("L", (420, 420), 90)
        g.paste(draw_face(160), (130, 100))
        g = g.rotate(angle, resample=Image.BILINEAR, fillcolor=90)
        assert len(det.detect(np.asarray(g.convert("RGB")))) == 1, angle

    class FakeEyes:  # two eye boxes, the right one 10 px lower over 50 px: atan(10/50)
        def detectMultiScale(self, roi, *args, **kwargs):
            return np.array([[10, 20, 10, 10], [60, 30, 10, 10]])
    det.eyes = FakeEyes()
    rgb = np.zeros((200, 200, 3), np.uint8)
    angle = det.eye_angle(rgb, (0, 0, 100, 100))
    assert angle == pytest.approx(np.degrees(np.arctan2(10, 50)))
    # a crop rotated by that angle brings two dots on the tilted line to one row
    im = Image.new("RGB", (200, 200))
    for x, y in ((75, 95), (125, 105)):
        im.putpixel((x, y), (255, 255, 255))
    crop = np.asarray(square_crop(im, (50, 50, 100, 100), 0.0, angle))[..., 0]
    ys, xs = np.nonzero(crop > 40)
    left, right = ys[xs < 50].mean(), ys[xs >= 50].mean()
    assert abs(left - right) < 1.5, (left, right)


def test_predict_refuses_networks_that_need_landmark_maps(tmp_path, capsys):
    from qcs.checkpoint import save_checkpoint
    from qcs.config import apply_overrides, load_config
    from qcs.families import build_model
    cfg = apply_overrides(load_config("tiny-pcd"),
                          ["model.num_classes=7", 'pcd.landmarks="heatmap"'])
    assert cfg.net.landmarks == "heatmap"
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "pcd" / "best", build_model(cfg),
                    {"config": cfg.to_dict(), "classes": CLASSES, "epoch": 1})
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    assert main(["predict", "--checkpoint", str(tmp_path / "pcd"), str(img), "--no-detect"]) == 2
    assert "input channels" in capsys.readouterr().err
