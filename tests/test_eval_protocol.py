"""The evaluation protocol and the published recipes' data pieces: the per-dataset
transforms, the stratified validation hold-out, FERPlus's official validation split, the
AffectNet epoch fraction, best.* chosen on validation with the test split evaluated once,
and horizontal-flip TTA in ``qcs eval`` / ``qcs predict``; on the built-in data (RAF-DB
layout) and on small FERPlus and AffectNet layouts the tests write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import QCS_MICRO_SET
from PIL import Image
from qcs.cli import main
from qcs.config import apply_overrides, load_config
from qcs.data import transforms as T
from qcs.data.splits import parse_val_split, stratified_holdout
from qcs.distributed import DistContext
from qcs.errors import ConfigError
from qcs.training import prepare_data, train
from qcs.training.data import build_loaders
from qcs.tta import flip_tta_logits, predict_logits
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def _normalise(img: torch.Tensor) -> torch.Tensor:
    return TF.normalize(img.float() / 255, T.IMAGENET_MEAN, T.IMAGENET_STD)


def test_test_transform_resize_then_centre_crop():
    img = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8)
    got = T.test_transform(224, resize=236)(img)
    resized = TF.resize(img, [236, 236], antialias=True)
    want = _normalise(resized[:, 6:230, 6:230])
    assert got.shape == (3, 224, 224) and torch.allclose(got, want, atol=1e-6)
    plain = T.test_transform(224)(img)
    assert torch.allclose(plain, _normalise(TF.resize(img, [224, 224], antialias=True)),
                          atol=1e-6)


def test_train_transform_steps_follow_the_recipe():
    def names(tf):
        return [type(t).__name__ for t in tf.transforms]

    affectnet = T.train_transform(224, resize=236, rotation=12, erasing=(0.03, 0.1))
    assert names(affectnet) == ["Resize", "RandomHorizontalFlip", "RandomRotation", "RandomCrop",
                                "ColorJitter", "ToDtype", "Normalize", "RandomErasing"]
    assert affectnet.transforms[0].size == [236, 236]
    assert list(affectnet.transforms[2].degrees) == [-12.0, 12.0]
    assert affectnet.transforms[-1].scale == (0.03, 0.1)
    raf = T.train_transform(224)
    assert names(raf) == ["Resize", "RandomHorizontalFlip", "ColorJitter", "ToDtype",
                          "Normalize", "RandomErasing"]
    no_jitter = T.train_transform(224, color_jitter=False)
    assert "ColorJitter" not in names(no_jitter)
    torch.manual_seed(0)
    out = affectnet(torch.randint(0, 256, (3, 250, 250), dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="resize must be 0 or >= the image size 224"):
        T.train_transform(224, resize=200)
    with pytest.raises(ValueError, match="erasing must be an area range"):
        T.train_transform(224, erasing=(0.2, 0.1))
    assert isinstance(T.test_transform(224, resize=232).transforms[1], v2.CenterCrop)


def test_stratified_holdout_is_seeded_stratified_and_disjoint():
    labels = [0] * 50 + [1] * 20 + [2] * 3 + [3] * 2
    train, val = stratified_holdout(labels, 0.1, seed=7)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    per_class = [sum(labels[i] == c for i in val) for c in range(4)]
    assert per_class == [5, 2, 1, 0]  # round(0.1 n), at least one, two left for training
    assert stratified_holdout(labels, 0.1, seed=7) == (train, val)
    assert stratified_holdout(labels, 0.1, seed=8)[1] != val
    with pytest.raises(ValueError, match="fraction must be in"):
        stratified_holdout(labels, 0.0, seed=0)


@pytest.mark.parametrize("text, value", [("none", "none"), ("Official", "official"),
                                         ("0.1", 0.1), (" 0.5", 0.5)])
def test_parse_val_split(text, value):
    assert parse_val_split(text) == value


@pytest.mark.parametrize("text", ["0", "0.6", "ten", "-0.1"])
def test_parse_val_split_rejects(text):
    with pytest.raises(ValueError, match="val_split must be none, official or a fraction"):
        parse_val_split(text)


def test_flip_tta_averages_the_mirrored_view():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    want = (model(x) + model(x[..., torch.arange(7, -1, -1)])) / 2
    assert torch.allclose(flip_tta_logits(model, x), want, atol=1e-6)
    assert not torch.allclose(want, model(x), atol=1e-4)  # the mirror view matters here
    assert torch.equal(predict_logits(model, x, flip_tta=False), model(x))
    with pytest.raises(ValueError, match="flip TTA expects RGB images"):
        flip_tta_logits(model, torch.randn(2, 5, 8, 8))


# --------------------------------------------------------- the protocol in training / eval

QUICK = QCS_MICRO_SET + ["train.epochs=2", "train.max_steps_per_epoch=2"]


def _cfg(extra):
    return apply_overrides(load_config("tiny"), QUICK + extra)


def _image(path, label: int, rng) -> None:
    """A 32 px image whose tint depends on the class (plus noise)."""
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float64)
    pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def ferplus_layout(root, per_class=(6, 3, 3), seed=0):
    """FER2013Train / FER2013Valid / FER2013Test with PNGs and majority-vote label.csv."""
    rng = np.random.default_rng(seed)
    for folder, n in zip(("FER2013Train", "FER2013Valid", "FER2013Test"), per_class):
        rows = []
        for k in range(8):
            for i in range(n):
                name = f"fer{k}_{i}.png"
                _image(root / folder / name, k, rng)
                votes = [0] * 10
                votes[k] = 9
                rows.append(f"{name},\"(0, 0, 32, 32)\"," + ",".join(map(str, votes)) + "\n")
        (root / folder / "label.csv").write_text("".join(rows))
    return root


def affectnet_layout(root, classes=8, train_per_class=(10, 4, 4, 4, 4, 4, 4, 6), val=3, seed=0):
    """The official Manually_Annotated_file_lists CSVs (imbalanced training classes)."""
    rng = np.random.default_rng(seed)
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height," \
             "facial_landmarks,expression,valence,arousal\n"
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    for split, counts in (("training", train_per_class), ("validation", [val] * classes)):
        rows = []
        for k in range(classes):
            for i in range(counts[k]):
                name = f"{k}/{split}_{k}_{i}.png"
                _image(root / "Manually_Annotated_Images" / name, k, rng)
                rows.append(f"{name},0,0,32,32,\"\",{k},0,0\n")
        (lists / f"{split}.csv").write_text(header + "".join(rows))
    return root


def _history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_holdout_on_the_built_in_data_picks_best_on_validation(qcs_micro_root, tmp_path,
                                                                capsys):
    """RAF-DB layout (the built-in data): 0.2 of each training class held out; best.* is
    chosen on it, the test split is evaluated once at the end, and that figure is what
    ``qcs eval`` of best.* computes independently."""
    cfg = _cfg(["data.format=raf-db", f"data.root={qcs_micro_root}"])
    cfg.data.val_split = "0.2"
    data = prepare_data(cfg, show_progress=False)
    assert len(data.val) == 7 * 12 and len(data.train) == 7 * 48 and len(data.test) == 7 * 20
    assert not set(map(str, data.val.images.paths)) & set(map(str, data.train.images.paths))
    sets = [a for s in QUICK for a in ("--set", s)]
    assert main(["train", "--data", "raf-db", "--data-root", str(qcs_micro_root),
                 "--val-split", "0.2", "--out", str(tmp_path / "run"), "--quiet", *sets]) == 0
    out = capsys.readouterr().out
    rows = _history(tmp_path / "run")
    assert all(r["selected_on"] == "val" and "val_acc" in r and "test_acc" not in r
               for r in rows)
    best = max(rows, key=lambda r: r["val_acc"])
    tested = json.loads((tmp_path / "run" / "test_best.json").read_text())
    assert tested["epoch"] == best["epoch"] and tested["selected_on"] == "val"
    assert f"(best.*, epoch {best['epoch']}, chosen on the validation split)" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--quiet",
                 "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "eval_best_test.json").read_text())
    assert ev["confusion"] == tested["confusion"] and ev["acc"] == pytest.approx(tested["acc"])


def test_selecting_on_test_is_explicit_and_named(qcs_micro_root, tmp_path, capsys):
    sets = [a for s in QUICK for a in ("--set", s)]
    assert main(["train", "--data", "raf-db", "--data-root", str(qcs_micro_root),
                 "--val-split", "0.2", "--select-on", "test", "--out", str(tmp_path / "run"),
                 *sets]) == 0
    out = capsys.readouterr().out
    rows = _history(tmp_path / "run")
    assert all(r["selected_on"] == "test" and "test_acc" in r for r in rows)
    assert not (tmp_path / "run" / "test_best.json").exists()
    assert "chosen on the test split" in out
    cfg = _cfg(["data.format=raf-db", f"data.root={qcs_micro_root}", "train.select_on=val"])
    with pytest.raises(ConfigError, match="train.select_on=val needs a validation split"):
        train(cfg, tmp_path / "run2", show_progress=False)


def test_ferplus_official_validation_split(tmp_path):
    root = ferplus_layout(tmp_path / "ferplus")
    cfg = _cfg(["data.format=ferplus", f"data.root={root}", 'data.val_split="official"'])
    data = prepare_data(cfg, show_progress=False)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 24, 24)
    assert all("FER2013Valid" in str(p) for p in data.val.images.paths)
    run = tmp_path / "run"
    result = train(cfg, run, show_progress=False)
    assert result.selected_on == "val" and result.test["epoch"] == result.best_epoch
    assert sum(map(sum, result.test["confusion"])) == 24  # every test image, once
    with pytest.raises(ConfigError, match="only FERPlus has an official validation split"):
        _cfg(["data.format=raf-db", f"data.root={root}", 'data.val_split="official"'])


def test_affectnet_holdout_balanced_epoch_fraction(tmp_path):
    root = affectnet_layout(tmp_path / "affectnet")
    cfg = _cfg(["data.format=affectnet8", f"data.root={root}", 'data.val_split="0.25"',
                "data.epoch_divisor=4", "train.batch_size=2", "train.max_steps_per_epoch=0"])
    data = prepare_data(cfg, show_progress=False)
    # round(0.25 n) per class (Python rounds halves to even): 10 -> 2, 4 -> 1, 6 -> 2
    assert data.val.images.counts() == [2, 1, 1, 1, 1, 1, 1, 2]
    assert len(data.train) == 40 - 10
    loaders = build_loaders(cfg, data, DistContext(), torch.device("cpu"))
    assert len(loaders.sampler) == 30 // 4 and loaders.steps == (30 // 4) // 2
    assert loaders.sampler.inner.balanced  # class-balanced anchors: AffectNet's default
    assert loaders.sampler.inner.items().shape == (30 // 4, 4)
    run = tmp_path / "run"
    result = train(cfg, run, show_progress=False)
    assert result.selected_on == "val" and (run / "test_best.json").is_file()


def _png_copy(src, dest, mirror: bool):
    """The RAF-DB layout at ``src`` copied to ``dest`` with every image stored as PNG
    (lossless), mirrored left-right when ``mirror``; the label list names the PNGs."""
    for path in src.rglob("*"):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix.lower() in (".jpg", ".png"):
            target.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(path).convert("RGB")
            if mirror:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(target.with_suffix(".png"))
        elif path.suffix == ".txt":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text().replace(".jpg", ".png"))


def test_flip_tta_in_eval_is_mirror_invariant(qcs_micro_root, tmp_path):
    """``qcs eval --flip-tta`` on the test images and on their mirror images gives the same
    confusion matrix; without TTA the logits differ (the mirror view matters). Both sets
    are stored losslessly: a re-encoded JPEG mirror differs in more than the mirroring."""
    cfg = _cfg(["data.format=raf-db", f"data.root={qcs_micro_root}", "train.epochs=1"])
    train(cfg, tmp_path / "run", show_progress=False)
    src, mirror = tmp_path / "orig", tmp_path / "mirror"
    _png_copy(qcs_micro_root, src, mirror=False)
    _png_copy(qcs_micro_root, mirror, mirror=True)
    results = {}
    for name, root in (("orig", src), ("mirror", mirror)):
        for tta in (False, True):
            out = tmp_path / f"eval-{name}-{tta}"
            assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", "raf-db",
                         "--data-root", str(root), "--quiet", "--out", str(out)]
                        + (["--flip-tta"] if tta else [])) == 0
            results[name, tta] = json.loads(next(out.glob("eval_*.json")).read_text())
    assert results["orig", True]["flip_tta"] and not results["orig", False]["flip_tta"]
    assert results["orig", True]["confusion"] == results["mirror", True]["confusion"]
    assert results["orig", True]["loss"] == pytest.approx(results["mirror", True]["loss"],
                                                          rel=1e-5)
    assert results["orig", False]["loss"] != pytest.approx(results["mirror", False]["loss"],
                                                           rel=1e-5)


def test_flip_tta_in_predict_is_mirror_invariant(qcs_micro_root, tmp_path):
    cfg = _cfg(["data.format=raf-db", f"data.root={qcs_micro_root}", "train.epochs=1"])
    train(cfg, tmp_path / "run", show_progress=False)
    image = next(p for p in sorted(qcs_micro_root.rglob("test_*")) if p.suffix == ".jpg")
    mirrored = tmp_path / "mirrored.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    probs = {}
    for tta in (False, True):
        out = tmp_path / f"pred-{tta}.json"
        assert main(["predict", str(image), str(mirrored), "--checkpoint", str(tmp_path / "run"),
                     "--no-detect", "-o", str(out)] + (["--flip-tta"] if tta else [])) == 0
        records = json.loads(out.read_text())
        probs[tta] = [list(r["probabilities"].values()) for r in records]
    assert probs[True][0] == pytest.approx(probs[True][1], abs=1e-5)
    assert probs[False][0] != pytest.approx(probs[False][1], abs=1e-5)
