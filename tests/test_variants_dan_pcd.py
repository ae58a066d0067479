"""DAN and PCD trainer families: shapes, parameter counts against hand-written formulas,
each loss against a hand-computed example, heat-map storage and loading, CLI selection,
and a short training run of each (through the shared trainer) whose loss falls."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from qcs.config import apply_overrides, load_config
from qcs.data import DataError, SynthParams, generate, load_split
from qcs.data.landmarks import (
    HeatmapDataset,
    HeatmapTransform,
    ensure_heatmaps,
    heatmap_path,
    read_heatmap,
    render_heatmaps,
    write_synth_heatmaps,
)
from qcs.families import build_model, get_family
from qcs.models.dan import DAN, ResNetFeatures
from qcs.models.fer_losses import affinity_loss, neaa_loss, partition_loss
from qcs.models.pcd import PCD
from torchvision.models import resnet18

# micro sizes of both families (own settings: seconds on one CPU thread)
DAN_MICRO = ["dan.resnet_layers=[1, 1, 1, 1]", "dan.resnet_widths=[8, 8, 16, 16]",
             "dan.backbone_size=56", "dan.heads=3"]
PCD_MICRO = ["pcd.backbone_depths=[1, 1, 1]", "pcd.backbone_widths=[8, 8, 16]",
             "pcd.backbone_size=32", "pcd.embed_dim=16",
             "pcd.heads=2", "pcd.vit_depth=1", "pcd.mlp_ratio=2.0"]
DATA_MICRO = ["data.image_size=32", "data.synth_size=32", "data.cache_in_memory=true",
              "optim.lr=3e-3", "train.batch_size=16", "train.threads=1"]


def _cfg(preset: str, extra: list[str], k: int = 7):
    cfg = apply_overrides(load_config(preset), extra)
    cfg.model.num_classes = k
    return cfg


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- parameter formulas

def _bn(c):
    return 2 * c


def _resnet_formula(layers, widths):
    n = 3 * 49 * widths[0] + _bn(widths[0])
    cin = widths[0]
    for i, (blocks, w) in enumerate(zip(layers, widths)):
        for j in range(blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            n += 9 * cin * w + _bn(w) + 9 * w * w + _bn(w)
            if stride != 1 or cin != w:
                n += cin * w + _bn(w)
            cin = w
    return n


def _dan_formula(layers, widths, heads, k):
    c = widths[-1]
    m, r = c // 2, c // 16
    spatial = (c * m + m + _bn(m)) + 3 * (c + _bn(c)) + m * c * (9 + 3 + 3)
    channel = c * r + r + _bn(r) + r * c + c
    return _resnet_formula(layers, widths) + heads * (spatial + channel) + (c * k + k) + _bn(k) \
        + k * c


def _ir50_formula(depths, widths):
    n = 27 * widths[0] + _bn(widths[0]) + widths[0]
    cin = widths[0]
    for depth, w in zip(depths, widths):
        for _ in range(depth):
            n += _bn(cin) + 9 * cin * w + w + 9 * w * w + _bn(w)
            if cin != w:
                n += cin * w + _bn(w)
            cin = w
    return n


def _pcd_formula(mc, c_lm, k):
    d, t = mc.embed_dim, (mc.backbone_size // 8) ** 2
    h = int(d * mc.mlp_ratio)
    block = 2 * d + 2 * d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d \
        + (d * h + h + h * d + d)
    return (_ir50_formula(mc.backbone_depths, mc.backbone_widths)
            + (mc.backbone_widths[-1] * d + d) + (c_lm * d + d) + 2 * d + (t + 1) * d
            + mc.vit_depth * block + 2 * d + d * k + k)


@pytest.mark.parametrize("preset,extra", [("tiny-dan", []), ("paper-dan", []),
                                          ("tiny-dan", DAN_MICRO)])
def test_dan_shapes_and_parameter_count(preset, extra):
    cfg = _cfg(preset, extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    mc = cfg.net
    assert isinstance(model, DAN)
    assert _count(model) == _dan_formula(mc.resnet_layers, mc.resnet_widths, mc.heads, 7)
    if preset == "paper-dan":
        return  # 224 px ResNet-18 forward is too slow for the quick suite
    model.eval()
    x = torch.randn(3, 3, 40, 40)
    assert model(x).shape == (3, 7)
    out = model.train().forward_branches(x[None])
    c = mc.resnet_widths[-1]
    heads, centers = out.extras["heads"], out.extras["centers"]
    assert out.logits.shape == (1, 3, 7) and out.features.shape == (3, c)
    assert heads.shape == (3, mc.heads, c) and centers.shape == (7, c)
    # log-softmax across heads: exp sums to one over the head axis
    torch.testing.assert_close(heads.exp().sum(1), torch.ones(3, c))
    with pytest.raises(ValueError, match=r"\[1, B, 3, H, W\]"):
        model.forward_branches(torch.randn(2, 3, 3, 40, 40))


def test_dan_trunk_is_torchvision_resnet18():
    """At the default sizes the FCN has resnet18's keys and shapes (minus its fc head), so
    MS-Celeb weights in torchvision naming load; load_pretrained reports the match."""
    ours = ResNetFeatures().state_dict()
    ref = {k: v for k, v in resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape)
                                                            for k, v in ref.items()}


def test_dan_load_pretrained(tmp_path):
    cfg = _cfg("tiny-dan", DAN_MICRO)
    src, dst = build_model(cfg), build_model(cfg)
    state = {f"module.{k}": v for k, v in src.features.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pth")
    report = str(get_family("dan").load_pretrained(dst, tmp_path / "w.pth"))
    assert "1 unused" in report and "0 missing" in report
    for k, v in src.features.state_dict().items():
        torch.testing.assert_close(dst.features.state_dict()[k], v)
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        get_family("dan").load_pretrained(dst, tmp_path / "bad.pth")


@pytest.mark.parametrize("preset,extra,c_lm", [("tiny-pcd", [], 3), ("tiny-pcd", PCD_MICRO, 3),
                                               ("paper-pcd", [], 128)])
def test_pcd_shapes_and_parameter_count(preset, extra, c_lm):
    cfg = _cfg(preset, extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, PCD)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == _pcd_formula(cfg.net, c_lm, 7)
    if model.landmark_net is not None:  # frozen: no gradients, stays in eval mode
        assert not any(p.requires_grad for p in model.landmark_net.parameters())
        assert not model.train().landmark_net.training
        return  # 112 px paper sizes: too slow for the quick suite
    s = cfg.data.image_size
    x = torch.randn(2, 6, s, s)
    assert model.eval()(x).shape == (2, 7)
    out = model.forward_branches(x[None])
    assert out.logits.shape == (1, 2, 7) and out.features.shape == (2, cfg.net.embed_dim)
    with pytest.raises(ValueError, match="heat-maps"):
        model(torch.randn(2, 3, s, s))


def test_pcd_dot_product_attention_uses_the_landmark_channel_max():
    """Zero heat-maps zero every fused image feature: the output no longer depends on the
    image; any non-zero map restores the dependence."""
    cfg = _cfg("tiny-pcd", PCD_MICRO)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    zero = torch.zeros(1, 3, 32, 32)
    out_a = model(torch.cat([a, zero], 1))
    out_b = model(torch.cat([b, zero], 1))
    torch.testing.assert_close(out_a, out_b)
    maps = torch.zeros(1, 3, 32, 32)
    maps[:, 2, 10:20, 10:20] = 1.0
    assert not torch.allclose(model(torch.cat([a, maps], 1)), model(torch.cat([b, maps], 1)))


# ---------------------------------------------------------------- losses by hand

def test_affinity_loss_hand_example():
    feat = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    centers = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1])
    # distances 1 and 8 -> mean 4.5; centre variance (unbiased) per dim: 2 and 0 -> 2
    assert affinity_loss(feat, labels, centers).item() == pytest.approx(2.25)
    # gradient on the centres: the own-centre pull plus the spread term
    c = centers.clone().requires_grad_(True)
    affinity_loss(feat, labels, c).backward()
    assert c.grad.abs().sum() > 0


def test_partition_loss_hand_example():
    heads = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # B=1, k=2, C=2: variances 2 and 2
    assert partition_loss(heads).item() == pytest.approx(math.log(1 + 2 / 2))
    heads3 = torch.tensor([[[0.0], [1.0], [2.0]], [[0.0], [2.0], [4.0]]])  # k=3: vars 1, 4
    expected = (math.log(1 + 3 / 1) + math.log(1 + 3 / 4)) / 2
    assert partition_loss(heads3).item() == pytest.approx(expected)
    assert partition_loss(torch.randn(4, 1, 5)).item() == 0.0


def _neaa_batch():
    # classes 0, 1 and neutral 2; sample 1 is class 0's most confident (lowest entropy)
    feat = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 3.0],
                         [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    logits = torch.tensor([[0.1, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                           [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    return feat, logits, labels


def test_neaa_loss_hand_example():
    feat, logits, labels = _neaa_batch()
    # class 0: anchor (2,2); MSE of (0,0) is 4, of the anchor 0 -> mean over N_c=2: 2
    # class 1: one sample, its own anchor: 0
    # neutral: pairs (a,b)=0.5, (a,c)=2, (b,c)=2.5 -> ordered sum 10 / (3-1)^2 = 2.5
    assert neaa_loss(feat, logits, labels, neutral=2).item() == pytest.approx(2 + 2.5)


def test_neaa_loss_no_neutral_and_single_neutral():
    feat, logits, labels = _neaa_batch()
    keep = labels != 2
    # no neutral sample in the batch: the anchor part only
    assert neaa_loss(feat[keep], logits[keep], labels[keep], neutral=2).item() == pytest.approx(2)
    # no neutral class at all (-1): class 2 is anchored like the others. Entropies of the
    # class-2 rows fall with the logit, so (0,2) is the anchor: MSE 2, 2.5, 0 -> mean 1.5
    assert neaa_loss(feat, logits, labels, neutral=-1).item() == pytest.approx(2 + 1.5)
    # a single neutral sample has nobody to be pulled to
    one = torch.tensor([0, 1, 2, 3])
    assert neaa_loss(feat[one], logits[one], labels[one], neutral=2).item() == pytest.approx(2)


def test_neaa_anchor_is_a_detached_target():
    feat, logits, labels = _neaa_batch()
    f = feat.clone().requires_grad_(True)
    neaa_loss(f, logits, labels, neutral=2).backward()
    assert f.grad[1].abs().sum() == 0           # the class-0 anchor is not pulled
    assert f.grad[0].abs().sum() > 0            # the other class-0 sample is
    assert f.grad[3:].abs().sum() > 0           # neutral samples pull each other


# ---------------------------------------------------------------- heat-maps

@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("dan_pcd_synth")
    return generate(out, SynthParams(seed=0, train_per_class=24, test_per_class=8, size=32))


def test_render_heatmaps_peaks_where_asked():
    maps = render_heatmaps([(0.25, 0.5), (0.75, 0.125)], 32)
    assert maps.shape == (32, 32, 2) and maps.dtype == np.uint8
    assert np.unravel_index(maps[..., 0].argmax(), (32, 32)) in {(15, 7), (16, 7), (15, 8),
                                                                 (16, 8)}
    assert np.unravel_index(maps[..., 1].argmax(), (32, 32))[1] in (23, 24)
    assert maps.max() >= 230 and maps[..., 0][0, 31] < 5


def test_synth_heatmaps_written_beside_images_and_loaded(micro_root):
    train = load_split("raf-db", micro_root, "train")
    assert not heatmap_path(train.paths[0]).exists()   # the generator itself writes none
    ensure_heatmaps(train, micro_root.parent)          # built-in data: rendered on demand
    first = heatmap_path(train.paths[0])
    assert first.parent.name == "landmarks" and first.parent.parent == train.paths[0].parent
    assert write_synth_heatmaps(micro_root) == 0       # all there: nothing rewritten
    assert len(load_split("raf-db", micro_root, "train")) == len(train)  # lists unchanged
    factors = [json.loads(x) for x in (micro_root / "synth_factors.jsonl").read_text()
               .splitlines() if x.strip()]
    row = next(r for r in factors if r["name"] == "train_00001.jpg")
    m = read_heatmap(train.paths[0], 32)
    assert m.shape == (3, 32, 32) and m.dtype == torch.uint8
    for ch, (x, y) in enumerate([row["eyes"][0], row["eyes"][1], row["mouth"]]):
        iy, ix = np.unravel_index(int(m[ch].argmax()), (32, 32))
        assert abs(ix + 0.5 - 32 * x) <= 1.5 and abs(iy + 0.5 - 32 * y) <= 1.5
    ds = HeatmapDataset(train, 32, HeatmapTransform(False), cache=True)
    x, y = ds[0]
    assert x.shape == (6, 32, 32) and int(y) == train.labels[0]
    torch.testing.assert_close(x[3:], m.float() / 255)
    xs, ys = ds[(0, 1)]
    assert xs.shape == (2, 6, 32, 32) and ys.tolist() == train.labels[:2]


def test_heatmap_flip_moves_image_and_maps_together():
    torch.manual_seed(0)
    img = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
    maps = torch.zeros(3, 8, 8, dtype=torch.uint8)
    maps[0, 2, 1] = 255   # left eye
    maps[1, 2, 6] = 200   # right eye
    tf = HeatmapTransform(True)
    tf.jitter = tf.erase = lambda t: t   # isolate the flip
    seen = set()
    for _ in range(20):
        out = tf(torch.cat([img, maps]))
        flipped = not torch.allclose(out[:3], tf.norm(img.float() / 255))
        seen.add(flipped)
        if flipped:  # eyes swap channels: channel 0 holds the mirrored right eye
            torch.testing.assert_close(out[:3], tf.norm(img.flip(-1).float() / 255))
            assert out[3, 2, 1] == pytest.approx(200 / 255) and out[4, 2, 6] == 1.0
            assert out[3].count_nonzero() == 1 and out[4].count_nonzero() == 1
        else:
            assert out[3, 2, 1] == 1.0 and out[4, 2, 6] == pytest.approx(200 / 255)
    assert seen == {True, False}


def test_missing_heatmaps_are_named(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(d / "x.png")
    lst = load_split("folder", tmp_path, "train")
    with pytest.raises(DataError, match=r"2 of 2 images .* no landmark heat-map .*landmarks"):
        ensure_heatmaps(lst, tmp_path)
    for p in lst.paths:
        heatmap_path(p).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(heatmap_path(p))
    ensure_heatmaps(lst, tmp_path)
    # the landmarks/ sub-directory is not read as images of the class
    assert len(load_split("folder", tmp_path, "train")) == 2


# ---------------------------------------------------------------- CLI and training

def test_cli_model_option_selects_family_and_keeps_variant():
    from qcs.cli import apply_args, build_parser
    parser = build_parser()
    for argv, family, variant in [(["--model", "dan"], "dan", "dan"),
                                  (["--model", "pcd"], "pcd", "pcd"),
                                  (["--model", "dcs"], "qcs", "dcs"),
                                  (["--variant", "baseline"], "qcs", "baseline")]:
        args = parser.parse_args(["train", *argv])
        cfg = load_config("tiny")
        apply_args(cfg, args)
        assert (cfg.model.family, cfg.family.run_name(cfg.net)) == (family, variant), argv
    assert load_config("tiny-dan").model.family == "dan"
    assert load_config("tiny-pcd").data.format == "synth"


@pytest.mark.parametrize("family,extra", [("dan", DAN_MICRO), ("pcd", PCD_MICRO)])
def test_short_training_run_loss_falls_and_checkpoint_predicts(family, extra, micro_root,
                                                               tmp_path):
    from qcs.inference import load_model
    from qcs.training import train
    cfg = apply_overrides(load_config(f"tiny-{family}"), extra + DATA_MICRO + [
        "data.format=raf-db", f"data.root={micro_root}", "train.epochs=4",
        "train.deterministic=true"])
    result = train(cfg, tmp_path / "run", show_progress=False)
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train_loss"] for h in hist]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result.best_acc > 0
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.model.family == family
    if family == "pcd":
        assert saved.net.neutral_class == 6   # the built-in data's "neutral"
    loaded = load_model(tmp_path / "run")       # what predict / export / eval rebuild
    assert type(loaded.model).__name__ == family.upper()
    x = torch.randn(2, 6 if family == "pcd" else 3, 32, 32)
    assert loaded.model(x).shape == (2, 7)
