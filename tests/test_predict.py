"""qcs predict: input collection, image modes, face detection and alignment on
photographs, batched classification against the model called directly, heat-map PCD
checkpoints, output formats, error paths."""

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
from face_helpers import photos
from qcs.faces import TEMPLATES, Detector, align_face, apply_transform, landmark_heatmaps
from use_helpers import CLASSES, make_checkpoint

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("predict_ckpt"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """two.jpg (the astronaut beside her mirror image), sub/grey.png (L), sub/rgba.png,
    blank.png (no face), broken.jpg (not an image), notes.txt (ignored when walking the
    folder)."""
    root = tmp_path_factory.mktemp("predict_images")
    (root / "sub").mkdir()
    small = Image.fromarray(photos()["astronaut"]).resize((256, 256), Image.LANCZOS)
    two = Image.new("RGB", (512, 256))
    two.paste(small, (0, 0))
    two.paste(small.transpose(Image.FLIP_LEFT_RIGHT), (256, 0))
    two.save(root / "two.jpg", quality=95)
    grey = small.convert("L")
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


def test_detector_finds_each_face_once(images):
    det = Detector()
    rgb = np.asarray(Image.open(images / "two.jpg").convert("RGB"))
    found = det.detect([rgb, np.full((200, 200, 3), 128, np.uint8)])
    assert len(found[0]) == 2 and found[1] == []
    # one face in each half, mirror images of each other
    left, right = sorted(found[0], key=lambda f: f.box[0])
    assert left.box[0] + left.box[2] < 256 < right.box[0]
    mirrored = np.stack([512 - right.landmarks[:, 0], right.landmarks[:, 1]], 1)[[1, 0, 2, 4, 3]]
    assert np.abs(mirrored - left.landmarks).max() < 3


def test_predict_cli_json_with_detection_annotation_and_errors(ckpt, images, tmp_path, capsys):
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
            assert np.asarray(r["landmarks"]).shape == (5, 2)
    # the RGBA file is the grey one with an opaque alpha: same face, same result
    assert by_file["rgba.png"][0]["box"] == by_file["grey.png"][0]["box"]
    assert "2 unreadable" in captured.err and "missing.jpg" in captured.err
    written = sorted(p.name for p in ann.iterdir())
    assert written == ["blank.png", "grey.png", "rgba.png", "two.png"]
    assert Image.open(ann / "two.png").size == (512, 256)


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
    loaded = load_model(ckpt)
    paths, _ = collect_inputs([str(images)])
    one = list(Predictor(loaded, batch_size=1).run(paths))
    many = list(Predictor(loaded, batch_size=64).run(paths))
    assert [r["file"] for r in one] == [r["file"] for r in many]
    for a, b in zip(one, many):
        assert a["status"] == b["status"] and a["box"] == b["box"]
        assert a["landmarks"] == b["landmarks"]
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
    monkeypatch.setitem(sys.modules, "cv2", None)        # OpenCV not installed:
    assert main(["predict", "--checkpoint", str(ckpt), str(img), "--detector", "haar"]) == 2
    assert "opencv" in capsys.readouterr().err.lower()
    assert main(["predict", "--checkpoint", str(ckpt), str(img)]) == 0  # MTCNN needs none


def test_photographs_rotated_collage_and_no_face(ckpt, tmp_path):
    """The issue's acceptance: the portrait, the portrait rotated by 25 degrees, the
    two-face collage, and no face on the coffee cup and the cat."""
    from qcs.faces import rotate_image
    p = photos()
    a = p["astronaut"]
    files = {"portrait": a, "rotated": rotate_image(a, 25)[0],
             "collage": np.concatenate([a, a[:, ::-1]], axis=1),
             "coffee": p["coffee"], "cat": p["cat"]}
    for name, arr in files.items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "*.png"), "-o",
                 str(out)]) == 0
    by: dict[str, list] = {}
    for r in json.loads(out.read_text()):
        by.setdefault(r["file"].replace("\\", "/").rsplit("/", 1)[-1][:-4], []).append(r)
    assert [len(by[k]) for k in ("portrait", "rotated", "collage")] == [1, 1, 2]
    assert by["coffee"][0]["status"] == by["cat"][0]["status"] == "no_face"
    for name in ("portrait", "rotated", "collage"):
        for r in by[name]:
            le, re, nose, lm, rm = np.asarray(r["landmarks"])
            assert r["status"] == "ok"
            assert np.linalg.norm(re - le) > 25 and lm[1] > le[1] and rm[1] > re[1]
    assert abs(by["portrait"][0]["roll_deg"]) < 10
    assert -35 < by["rotated"][0]["roll_deg"] < -15


def test_aligned_crop_is_what_the_network_sees(ckpt, tmp_path):
    """With alignment the input is the five-point warp onto the template; --no-align
    gives the square box crop, a different input."""
    loaded = load_model(ckpt)
    path = tmp_path / "a.png"
    Image.fromarray(photos()["astronaut"]).save(path)
    aligned = list(Predictor(loaded).run([path]))[0]
    boxed = list(Predictor(loaded, align=False).run([path]))[0]
    assert aligned["landmarks"] == boxed["landmarks"] and aligned["box"] == boxed["box"]
    img = Image.open(path).convert("RGB")
    size, tf = loaded.image_size, transforms.test_transform(loaded.image_size)
    crop, _ = align_face(img, np.asarray(aligned["landmarks"]), size, TEMPLATES["raf-db"])
    box = square_crop(img, tuple(boxed["box"]), 0.2).resize((size, size), Image.BILINEAR)
    for rec, pic in ((aligned, crop), (boxed, box)):
        x = torch.from_numpy(np.asarray(pic).copy()).permute(2, 0, 1)
        with torch.no_grad():
            p = torch.softmax(loaded.model(tf(x)[None]), 1)[0]
        got = torch.tensor([rec["probabilities"][c] for c in CLASSES])
        torch.testing.assert_close(got, p, atol=2e-5, rtol=0)  # landmarks rounded to 0.1 px
    # the two inputs differ (the box crop is wider and not levelled)
    assert np.abs(np.asarray(crop, float) - np.asarray(box, float)).mean() > 10


def pcd_heatmap_checkpoint(directory):
    from qcs.checkpoint import save_checkpoint
    from qcs.config import apply_overrides, load_config
    from qcs.families import build_model
    cfg = apply_overrides(load_config("tiny-pcd"),
                          ["model.num_classes=7", 'pcd.landmarks="heatmap"'])
    assert cfg.net.landmarks == "heatmap"
    torch.manual_seed(0)
    save_checkpoint(directory / "best", build_model(cfg),
                    {"config": cfg.to_dict(), "classes": CLASSES, "epoch": 1})
    return directory


def test_pcd_heatmap_checkpoint_predicts_on_photos(tmp_path):
    from qcs.data.landmarks import HeatmapTransform
    ckpt = pcd_heatmap_checkpoint(tmp_path / "pcd")
    path = tmp_path / "a.png"
    Image.fromarray(photos()["astronaut"]).save(path)
    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(ckpt), str(path), "-o", str(out)]) == 0
    rec = json.loads(out.read_text())[0]
    assert rec["status"] == "ok" and np.asarray(rec["landmarks"]).shape == (5, 2)
    # the same input built by hand: aligned crop + maps of the landmarks in the crop
    loaded = load_model(ckpt)
    s = loaded.image_size
    crop, m = align_face(Image.open(path).convert("RGB"), np.asarray(rec["landmarks"]), s,
                         TEMPLATES["raf-db"])
    maps = landmark_heatmaps(apply_transform(m, np.asarray(rec["landmarks"])), s)
    x = torch.cat([torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1),
                   torch.from_numpy(maps).permute(2, 0, 1)])
    with torch.no_grad():
        p = torch.softmax(loaded.model(HeatmapTransform(train=False)(x)[None]), 1)[0]
    got = torch.tensor([rec["probabilities"][c] for c in CLASSES])
    torch.testing.assert_close(got, p, atol=2e-5, rtol=0)
    # a crop given as is (--no-detect) still gets its maps from the landmarks found in it
    face = Image.fromarray(np.asarray(crop))
    face.resize((160, 160)).save(tmp_path / "crop.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "crop.png"),
                 "--no-detect", "-o", str(out)]) == 0
    assert json.loads(out.read_text())[0]["status"] == "ok"
    Image.new("RGB", (64, 64), (40, 90, 160)).save(tmp_path / "flat.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "flat.png"),
                 "--no-detect", "-o", str(out)]) == 0
    rec = json.loads(out.read_text())[0]
    assert rec["status"] == "no_face" and "heat maps" in rec["message"]
