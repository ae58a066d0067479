"""Dataset readers on small fixture trees, bad images, the built-in generator."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from qcs.data import (
    DataError,
    ImageDataset,
    SynthParams,
    affectnet,
    check_images,
    ferplus,
    folder,
    generate,
    load_split,
    raf_db,
)
from qcs.data.synth import BACKGROUNDS


def _img(path, value=128, size=(10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


@pytest.fixture
def raf_tree(tmp_path):
    root = tmp_path / "basic"
    (root / "EmoLabel").mkdir(parents=True)
    lines = ["train_00001.jpg 1", "train_00002.jpg 7", "test_00001.jpg 4", "train_00003.jpg 4",
             "test_00002.jpg 2"]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, line in enumerate(lines):
        stem = line.split(".")[0]
        _img(root / "Image" / "aligned" / f"{stem}_aligned.jpg", value=10 * i)
    return root


def test_raf_db_reader(raf_tree):
    train = raf_db(raf_tree.parent, "train")  # the parent of basic/ works too
    assert [p.name for p in train.paths] == ["train_00001_aligned.jpg", "train_00002_aligned.jpg",
                                             "train_00003_aligned.jpg"]
    assert train.labels == [0, 6, 3]
    assert train.classes[0] == "surprise" and train.classes[6] == "neutral"
    test = load_split("raf-db", raf_tree, "test")
    assert test.labels == [3, 1] and test.counts() == [0, 1, 0, 1, 0, 0, 0]
    ds = ImageDataset(test, 8)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == 3
    xs, ys = ds[(1, 0)]
    assert xs.shape == (2, 3, 8, 8) and ys.tolist() == [1, 3]


def test_raf_db_bad_label_line(raf_tree):
    path = raf_tree / "EmoLabel" / "list_patition_label.txt"
    path.write_text("train_00001.jpg 1\ntrain_00002.jpg 9\n")
    with pytest.raises(DataError, match=r"list_patition_label.txt:2: .*label 1-7"):
        raf_db(raf_tree, "train")
    with pytest.raises(DataError, match="RAF-DB label list not found"):
        raf_db(raf_tree / "nowhere", "train")


def test_missing_and_broken_images_are_named(raf_tree):
    aligned = raf_tree / "Image" / "aligned"
    (aligned / "train_00002_aligned.jpg").unlink()
    (aligned / "train_00003_aligned.jpg").write_bytes(b"not a jpeg at all")
    train = raf_db(raf_tree, "train")
    bad = check_images(train)
    assert len(bad) == 2
    assert "image not found" in bad[0] and "train_00002_aligned.jpg" in bad[0]
    assert "cannot read image" in bad[1] and "train_00003_aligned.jpg" in bad[1]
    ds = ImageDataset(train, 8)
    ds[0]
    with pytest.raises(DataError, match="train_00002_aligned.jpg"):
        ds[1]
    with pytest.raises(DataError, match="train_00003_aligned.jpg"):
        ds[2]
    with pytest.raises(DataError, match="train_00002_aligned.jpg"):
        ImageDataset(train, 8, cache=True)  # the first bad one met while caching


def test_ferplus_majority_vote(tmp_path):
    d = tmp_path / "FER2013Train"
    rows = {
        "fer0.png": [0, 8, 1, 0, 1, 0, 0, 0, 0, 0],   # happiness (single votes are outliers)
        "fer1.png": [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],   # no majority: dropped
        "fer2.png": [0, 0, 0, 0, 0, 0, 0, 0, 7, 3],   # unknown: dropped
        "fer3.png": [1, 0, 0, 0, 0, 0, 0, 2, 0, 1],   # contempt (2 of 2 kept votes)
        "fer4.png": [0, 0, 0, 0, 0, 0, 0, 0, 2, 8],   # not a face: dropped
        "fer5.png": [3, 0, 0, 0, 4, 0, 0, 0, 0, 0],   # anger 4 of 7 > half
    }
    d.mkdir()
    (d / "label.csv").write_text("".join(
        f'{name},"(0, 0, 48, 48)",{",".join(map(str, v))}\n' for name, v in rows.items()))
    for name in rows:
        _img(d / name, mode="L", size=(48, 48))
    lst = ferplus(tmp_path, "train")
    assert [p.name for p in lst.paths] == ["fer0.png", "fer3.png", "fer5.png"]
    assert [lst.classes[i] for i in lst.labels] == ["happiness", "contempt", "anger"]
    assert "3 images" in lst.notes[0]
    x, _ = ImageDataset(lst, 16)[0]
    assert x.shape == (3, 16, 16)  # grey images come out RGB
    (d / "label.csv").write_text('fer0.png,"box",1,2,x\n')
    with pytest.raises(DataError, match=r"label.csv:1"):
        ferplus(tmp_path, "train")


def test_affectnet_official_and_plain_lists(tmp_path):
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    header = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
              "expression,valence,arousal\n")
    codes = [0, 7, 3, 9, 6, 10, 1]
    (lists / "training.csv").write_text(header + "".join(
        f'{i}/img{i}.jpg,0,0,10,10,"1;2",{c},0.1,0.2\n' for i, c in enumerate(codes)))
    (lists / "validation.csv").write_text(header + '1/v.jpg,0,0,10,10,"",2,0,0\n')
    seven = affectnet(tmp_path, "train", 7)
    assert seven.labels == [0, 3, 6, 1] and len(seven.classes) == 7
    assert seven.paths[1] == tmp_path / "Manually_Annotated_Images" / "2" / "img2.jpg"
    eight = load_split("affectnet8", tmp_path, "train")
    assert eight.labels == [0, 7, 3, 6, 1] and eight.classes[7] == "contempt"
    assert load_split("affectnet7", tmp_path, "test").labels == [2]
    (tmp_path / "mine.txt").write_text("a/x.jpg 4\nb/y z.jpg 7\n")
    plain = affectnet(tmp_path, "train", 8, list_file="mine.txt")
    assert plain.labels == [4, 7] and plain.paths[1] == tmp_path / "b" / "y z.jpg"
    (tmp_path / "bad.txt").write_text("a/x.jpg happy\n")
    with pytest.raises(DataError, match=r"bad.txt:1: .*not an integer"):
        affectnet(tmp_path, "train", 7, list_file="bad.txt")


def test_folder_tree(tmp_path):
    for cls, n in (("sad", 2), ("happy", 1)):
        for i in range(n):
            _img(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "sad" / "notes.txt").write_text("ignored")
    lst = folder(tmp_path, "train")
    assert lst.classes == ("happy", "sad") and lst.labels == [0, 1, 1]
    with pytest.raises(DataError, match="is not a directory"):
        folder(tmp_path, "test")
    with pytest.raises(DataError, match="unknown data format"):
        load_split("imagenet", tmp_path, "train")


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_readable(tmp_path):
    params = SynthParams(seed=5, train_per_class=2, test_per_class=1, size=40)
    a = generate(tmp_path / "a", params)
    b = generate(tmp_path / "b", params)
    assert _digest(a) == _digest(b)
    c = generate(tmp_path / "c", SynthParams(seed=6, train_per_class=2, test_per_class=1, size=40))
    assert _digest(a) != _digest(c)
    train, test = raf_db(a, "train"), raf_db(a, "test")
    assert train.counts() == [2] * 7 and test.counts() == [1] * 7
    assert not check_images(train) and Image.open(train.paths[0]).size == (40, 40)
    with pytest.raises(FileExistsError):
        generate(tmp_path / "a", params)


def _corner_background(path):
    """Nearest background colour (by chromaticity, which lighting does not change) of the
    bottom-left corner patch."""
    arr = np.asarray(Image.open(path), dtype=np.float64)[-6:, :6].reshape(-1, 3).mean(0)
    chroma = arr / arr.sum()
    ref = BACKGROUNDS / BACKGROUNDS.sum(1, keepdims=True)
    return int(np.argmin(((ref - chroma) ** 2).sum(1)))


def test_synth_bias_ties_background_to_class_in_train_split_only(tmp_path):
    root = generate(tmp_path, SynthParams(seed=1, train_per_class=12, test_per_class=12,
                                          size=48, bias=True, bias_strength=0.9))
    factors = [json.loads(line)
               for line in (root / "synth_factors.jsonl").read_text().splitlines()]
    for split, lo, hi in (("train", 0.8, 1.0), ("test", 0.0, 0.35)):
        lst = raf_db(root, split)
        seen = [_corner_background(p) for p in lst.paths]
        match = np.mean([s == y for s, y in zip(seen, lst.labels)])
        assert lo <= match <= hi, (split, match)
        declared = [f["background"] for f in factors if f["split"] == split]
        assert np.mean([s == d for s, d in zip(seen, declared)]) > 0.95  # pixels agree with log
    unbiased = generate(tmp_path / "u", SynthParams(seed=1, train_per_class=12,
                                                    test_per_class=1, size=48))
    lst = raf_db(unbiased, "train")
    assert np.mean([_corner_background(p) == y for p, y in zip(lst.paths, lst.labels)]) < 0.35
