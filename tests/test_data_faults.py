"""Bad data: truncated / corrupt / missing images, malformed list lines, labels out of
range, empty classes. Each must raise a DataError naming the file (and the list line), and
with ``skip_bad`` / ``--skip-bad`` be left out and counted by reason."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import QCS_MICRO_SET
from PIL import Image
from qcs.cli import main
from qcs.data import DataError, ImageDataset, affectnet, ferplus, raf_db, screen_data
from qcs.data.datasets import empty_classes, screen_images, skip_summary


def _jpeg(path, seed=0, size=(16, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _raf(tmp_path, lines: list[str]):
    """A RAF-DB tree whose list file holds ``lines``; every named image exists."""
    (tmp_path / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, line in enumerate(lines):
        if line.split():
            stem = line.split()[0].rsplit(".", 1)[0]
            _jpeg(tmp_path / "Image" / "aligned" / f"{stem}_aligned.jpg", seed=i)
    return tmp_path / "EmoLabel" / "list_patition_label.txt"


GOOD = ["train_00001.jpg 1", "train_00002.jpg 4", "train_00003.jpg 7"]


@pytest.fixture
def qcs_log():
    """The text the ``qcs`` logger emits during the test (its own handler: the CLI's
    stdout handler may be bound to an earlier test's captured stream)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("qcs")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.mark.parametrize("bad_line, reason, problem", [
    ("train_00009.jpg", "malformed line", "missing label"),
    ("train_00009.jpg happy", "malformed line", "not an integer"),
    ("train_00009.jpg 3 extra", "malformed line", "3 fields"),
    ("train_00009.jpg 8", "label out of range", "label 8 out of range"),
    ("train_00009.jpg 0", "label out of range", "label 0 out of range"),
    ("train_00009.jpg -2", "label out of range", "label -2 out of range"),
])
def test_raf_db_bad_line_is_named_then_skipped(tmp_path, bad_line, reason, problem):
    list_file = _raf(tmp_path, [GOOD[0], GOOD[1], bad_line, GOOD[2]])
    with pytest.raises(DataError, match=rf"list_patition_label.txt:3: .*{problem}"):
        raf_db(tmp_path, "train")
    lst = raf_db(tmp_path, "train", skip_bad=True)
    assert lst.labels == [0, 3, 6]                        # the three good lines, 1-based -> 0-based
    assert [p.name for p in lst.paths] == ["train_00001_aligned.jpg", "train_00002_aligned.jpg",
                                           "train_00003_aligned.jpg"]
    assert lst.origins == [f"{list_file}:1", f"{list_file}:2", f"{list_file}:4"]
    assert list(lst.skipped) == [reason] and len(lst.skipped[reason]) == 1
    assert f"{list_file}:3" in lst.skipped[reason][0]


def test_ferplus_bad_rows_are_named_then_skipped(tmp_path):
    d = tmp_path / "FER2013Train"
    d.mkdir()
    good = 'a.png,"(0, 0, 48, 48)",0,8,0,0,0,0,0,0,0,0'
    rows = [good, 'b.png,"box",1,2,3',                      # too few fields
            'c.png,"box",0,8,0,0,0,0,0,0,0,0,9',            # one extra
            'd.png,"box",x,8,0,0,0,0,0,0,0,0',              # not a number
            'e.png,"box",0,-8,0,0,0,0,0,0,0,0']             # negative vote count
    (d / "label.csv").write_text("\n".join(rows) + "\n")
    for line, what in ((2, "got 5 fields"), (3, "got 13 fields"), (4, "not numbers"),
                       (5, "must be >= 0")):
        (d / "label.csv").write_text("\n".join([good, rows[line - 1]]) + "\n")
        with pytest.raises(DataError, match=rf"label.csv:2: .*{what}"):
            ferplus(tmp_path, "train")
    (d / "label.csv").write_text("\n".join(rows) + "\n")
    lst = ferplus(tmp_path, "train", skip_bad=True)
    assert [p.name for p in lst.paths] == ["a.png"] and lst.labels == [1]
    counts, messages = skip_summary([lst])
    assert counts == {"malformed line": 3, "label out of range": 1}
    assert [m.split(": ")[0].rsplit(":", 1)[1] for m in messages] == ["2", "3", "4", "5"]


def test_affectnet_bad_rows_name_the_csv_line(tmp_path):
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    header = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
              "expression,valence,arousal\n")
    body = ['1/a.jpg,0,0,10,10,"1;2",3,0,0', '1/b.jpg,0,0,10,10,"1;2",happy,0,0',
            '1/c.jpg,0,0,10,10,"1;2",12,0,0', '1/d.jpg,0,0,10,10,"1;2",9,0,0',
            '1/e.jpg,0,0,10,10,"1;2",,0,0']
    (lists / "training.csv").write_text(header + "\n".join(body) + "\n")
    with pytest.raises(DataError, match=r"training.csv:3: .*'happy' is not an integer"):
        affectnet(tmp_path, "train", 8)
    lst = affectnet(tmp_path, "train", 8, skip_bad=True)
    assert [p.name for p in lst.paths] == ["a.jpg"] and lst.labels == [3]  # 9: no-face, dropped
    counts, messages = skip_summary([lst])
    assert counts == {"malformed line": 2, "label out of range": 1}
    assert "training.csv:4: expression code 12 out of range" in messages[2]
    assert "training.csv:6:" in messages[1] and "missing label" in messages[1]


def _faulty_images(tmp_path):
    """Five listed images: good, truncated JPEG, random bytes, missing, good."""
    list_file = _raf(tmp_path, [f"train_0000{i}.jpg {i}" for i in range(1, 6)])
    aligned = tmp_path / "Image" / "aligned"
    data = _jpeg(aligned / "train_00002_aligned.jpg", seed=9, size=(64, 64))
    (aligned / "train_00002_aligned.jpg").write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    (aligned / "train_00003_aligned.jpg").write_bytes(rng.integers(0, 256, 600, np.uint8)
                                                      .tobytes())
    (aligned / "train_00004_aligned.jpg").unlink()
    return list_file


def test_truncated_corrupt_and_missing_images(tmp_path):
    list_file = _faulty_images(tmp_path)
    lst = raf_db(tmp_path, "train")
    ds = ImageDataset(lst, 8)
    assert ds[0][0].shape == (3, 8, 8) and ds[4][0].shape == (3, 8, 8)
    # read lazily (a worker): the error names the image and the list line
    for i, what in ((1, "truncated"), (2, "cannot identify"), (3, "image not found")):
        with pytest.raises(DataError, match=rf"{what}.*listed at .*:{i + 1}\)"):
            ds[i]
    kept, bad = screen_images(lst, skip_bad=False)
    assert kept is lst and len(bad) == 3
    kept, bad = screen_images(lst, skip_bad=True)
    assert [p.name for p in kept.paths] == ["train_00001_aligned.jpg", "train_00005_aligned.jpg"]
    assert kept.labels == [0, 4] and kept.origins == [f"{list_file}:1", f"{list_file}:5"]
    assert {k: len(v) for k, v in kept.skipped.items()} == {"unreadable image": 2,
                                                             "missing image": 1}
    assert all(ImageDataset(kept, 8)[i][0].shape == (3, 8, 8) for i in range(2))


def test_empty_classes_raise_or_are_counted(tmp_path, qcs_log):
    _raf(tmp_path, GOOD + ["test_00001.jpg 1"])
    train, test = raf_db(tmp_path, "train"), raf_db(tmp_path, "test")
    assert empty_classes(train) == [
        f"{train.source}: class {name!r} (label {k}) has no images"
        for k, name in [(1, "fear"), (2, "disgust"), (4, "sadness"), (5, "anger")]]
    with pytest.raises(DataError, match=r"empty classes[\s\S]*'fear' \(label 1\)[\s\S]*'anger'"):
        screen_data(train, test, decode=False, skip_bad=False, show_progress=False)
    tr, te = screen_data(train, test, decode=True, skip_bad=True, show_progress=False)
    assert tr.labels == train.labels and te.labels == test.labels
    assert "skipped 4 items (--skip-bad): 4 empty class" in qcs_log


def test_single_image_classes_raise_or_are_left_out(tmp_path, qcs_log):
    # QCS / DCS need a positive other than the anchor: a class with one image cannot be
    # sampled (the sampler itself would fail without naming the class or the file)
    lines = ["train_00001.jpg 1", "train_00002.jpg 1", "train_00003.jpg 4", "train_00004.jpg 4",
             "train_00005.jpg 7", "test_00001.jpg 1"]
    _raf(tmp_path, lines)
    train, test = raf_db(tmp_path, "train"), raf_db(tmp_path, "test")
    # one image is fine for the single-branch networks (only empty classes are reported)
    with pytest.raises(DataError, match="empty classes"):
        screen_data(train, test, decode=False, skip_bad=False, show_progress=False)
    with pytest.raises(DataError, match=r"too small to sample[\s\S]*\[train\]: class 'neutral' "
                                        r"\(label 6\) has 1 image\(s\)") as err:
        screen_data(train, test, decode=False, skip_bad=False, show_progress=False,
                    min_per_class=2)
    assert str(tmp_path) in str(err.value)
    tr, _ = screen_data(train, test, decode=False, skip_bad=True, show_progress=False,
                        min_per_class=2)
    assert tr.labels == [0, 0, 3, 3]  # the neutral image is out, the others kept in order
    assert "skipped 5 items (--skip-bad): 1 single-image class, 4 empty class" in qcs_log
    from qcs.data import TupleSampler
    items = TupleSampler(torch.tensor(tr.labels), len(tr.classes), branches=4, seed=0).items()
    assert set(items.flatten().tolist()) <= set(range(4))


def _faulty_micro(qcs_micro_root, tmp_path):
    """The micro dataset with 2 bad images and 2 bad list lines (4 faults)."""
    root = tmp_path / "basic"
    shutil.copytree(qcs_micro_root, root)
    aligned = root / "Image" / "aligned"
    data = (aligned / "train_00005_aligned.jpg").read_bytes()
    (aligned / "train_00005_aligned.jpg").write_bytes(data[: len(data) // 3])    # truncated
    rng = np.random.default_rng(1)
    (aligned / "test_00007_aligned.jpg").write_bytes(rng.integers(0, 256, 900, np.uint8)
                                                     .tobytes())                # corrupt
    list_file = root / "EmoLabel" / "list_patition_label.txt"
    lines = list_file.read_text().splitlines()
    lines[10] = lines[10].split()[0]                                            # no label
    lines[20] = lines[20].split()[0] + " 9"                                     # out of range
    list_file.write_text("\n".join(lines) + "\n")
    return root, list_file


def test_cli_train_and_eval_with_bad_data(qcs_micro_root, tmp_path, capsys, qcs_log):
    root, list_file = _faulty_micro(qcs_micro_root, tmp_path)
    sets = [a for s in QCS_MICRO_SET for a in ("--set", s)]
    common = ["--data", "raf-db", "--data-root", str(root), *sets]  # not -q: INFO is read
    assert main(["train", *common, "--out", str(tmp_path / "r0")]) == 2
    err = capsys.readouterr().err
    assert f"{list_file}:11: expected 'name label'" in err and "missing label" in err
    assert "--skip-bad" in err
    run = tmp_path / "run"
    code = main(["train", *common, "--skip-bad", "--variant", "baseline", "--epochs", "1",
                 "--max-steps", "2", "--out", str(run)])
    assert code == 0 and "test accuracy:" in capsys.readouterr().out
    out = "\n".join(qcs_log)
    assert ("skipped 4 items (--skip-bad): 1 malformed line, 1 label out of range, "
            "2 unreadable image") in out
    assert "train_00005_aligned.jpg" in out and "test_00007_aligned.jpg" in out
    assert f"{list_file}:21: label 9 out of range" in out
    # the micro data has 60 train / 20 test images per class: 3 train and 1 test item left out
    assert "[train]: 417 images" in out and "[test]: 139 images" in out
    # eval reads the run's config, skip_bad included
    qcs_log.clear()
    assert main(["eval", "--checkpoint", str(run / "best"), *common[:4], "--quiet",
                 "--out", str(tmp_path / "ev")]) == 0
    assert "139 test images" in capsys.readouterr().out
    assert any(line.startswith("skipped 4 items (--skip-bad)") for line in qcs_log)
