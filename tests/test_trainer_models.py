"""Network shapes, parameter counts (against a hand-written formula), inference path,
backbone weight loading, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from qcs.config import Config, ModelConfig, load_config
from qcs.families import build_model
from qcs.families.qcs import QCSConfig
from qcs.models import count_parameters, load_backbone_weights, qcs_loss


def small_cfg(variant: str, **kw) -> Config:
    net = QCSConfig(variant=variant, backbone_depths=[1, 2, 1],
                    backbone_widths=[4, 8, 12], backbone_size=16, embed_dim=16, tokens_side=2,
                    vit_depth=2, vit_cross_depth=1, heads=2, mlp_ratio=2.0, backend="reference")
    for k, v in kw.items():
        setattr(net, k, v)
    return Config(model=ModelConfig(family="qcs", num_classes=5), net=net)


# --- an independent count of the parameters the spec describes --------------------------
def _ir_unit(cin: int, cout: int) -> int:
    shortcut = 0 if cin == cout else cin * cout + 2 * cout
    return shortcut + 2 * cin + 9 * cin * cout + cout + 9 * cout * cout + 2 * cout


def _backbone(depths, widths) -> int:
    n = 27 * widths[0] + 3 * widths[0]  # stem conv + BN + PReLU
    cin = widths[0]
    for d, w in zip(depths, widths):
        for _ in range(d):
            n += _ir_unit(cin, w)
            cin = w
    return n


def _embed(c: int, size: int, dim: int, side: int) -> int:
    stride2 = size // 2 >= side
    n = 9 * c * c + c
    size = (size + 1) // 2 if stride2 else size
    convs, cin = 0, c
    while size > side:
        n += 9 * cin * dim + dim
        cin, size, convs = dim, (size + 1) // 2, convs + 1
    if convs == 0:
        n += c * dim + dim
    return n


def _vit(d: int, tokens: int, depth: int, ratio: float, k: int) -> int:
    h = int(d * ratio)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    return d + (tokens + 1) * d + depth * block + 2 * d + 2 * (d * d + d) + d * k + k


def _cross(d: int, ratio: float, quad: bool) -> int:
    h = int(d * ratio)
    return 4 * d + (2 * d * d + 2 * d) + (d * h + h) + (h * d + d) + (1 if quad else 0)


def expected_params(config: Config) -> int:
    cfg, num_classes = config.net, config.model.num_classes
    sizes = [cfg.backbone_size // 2 ** (i + 1) for i in range(3)]
    tokens = 3 * cfg.tokens_side ** 2
    n = _backbone(cfg.backbone_depths, cfg.backbone_widths)
    n += sum(_embed(w, s, cfg.embed_dim, cfg.tokens_side)
             for w, s in zip(cfg.backbone_widths, sizes))
    n += _vit(cfg.embed_dim, tokens, cfg.vit_depth, cfg.mlp_ratio, num_classes)
    if cfg.variant != "baseline":
        n += 3 * _cross(cfg.embed_dim, cfg.mlp_ratio, cfg.variant == "qcs")
        n += _vit(cfg.embed_dim, tokens, cfg.vit_cross_depth, cfg.mlp_ratio, num_classes)
    return n


@pytest.mark.parametrize("variant", ["qcs", "dcs", "baseline"])
def test_parameter_count_matches_formula(variant):
    cfg = small_cfg(variant)
    assert count_parameters(build_model(cfg)) == expected_params(cfg)


@pytest.mark.parametrize("preset", ["paper-qcs", "paper-dcs", "paper-baseline"])
def test_paper_parameter_counts(preset):
    cfg = load_config(preset)
    cfg.model.num_classes = 7
    model = build_model(cfg)
    assert count_parameters(model) == expected_params(cfg)
    # the paper geometry: IR50 stages of 3/4/14 units, three 7x7 levels = 147 tokens
    assert len(model.ir_back.body) == 21
    assert model.vit_base.pos_embed.shape == (1, 148, 768)


@pytest.mark.parametrize("variant,branches", [("qcs", 4), ("dcs", 2), ("baseline", 1)])
def test_branch_shapes(variant, branches):
    torch.manual_seed(0)
    model = build_model(small_cfg(variant))
    xs = torch.randn(branches, 3, 3, 20, 20)  # 20 px: resized to 16 inside the backbone
    out = model.forward_branches(xs)
    base, cross = out.logits, out.cross
    assert base.shape == (branches, 3, 5)
    if variant == "baseline":
        assert cross is None
    else:
        assert cross.shape == (branches, 3, 5)
    assert model.tokens(xs[0]).shape == (3, 12, 16)  # 3 levels x 2x2 tokens
    with pytest.raises(ValueError, match=rf"\[{branches}, B, 3, H, W\]"):
        model.forward_branches(torch.randn(branches + 1, 2, 3, 16, 16))


def test_inference_uses_base_network_only():
    torch.manual_seed(0)
    model = build_model(small_cfg("qcs")).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    out.sum().backward()
    cross_params = [p for n, p in model.named_parameters()
                    if n.startswith(("cross.", "vit_cross."))]
    assert cross_params and all(p.grad is None for p in cross_params)
    # a baseline network holding only the base weights gives the same logits
    baseline = build_model(small_cfg("baseline")).eval()
    baseline.load_state_dict(model.base_state_dict())
    torch.testing.assert_close(baseline(x), out)
    # the base logits of the branch forward are the single-batch forward, per branch
    xs = torch.randn(4, 2, 3, 16, 16)
    base = model.forward_branches(xs).logits
    torch.testing.assert_close(base[2], model(xs[2]), rtol=1e-5, atol=1e-5)


def test_backbone_weights_prefixes_and_report(tmp_path):
    torch.manual_seed(0)
    src = build_model(small_cfg("baseline")).ir_back
    state = {f"module.ir_back.{k}": v for k, v in src.state_dict().items()}
    state["module.ir_back.output_layer.0.weight"] = torch.ones(3)       # unused stage
    state["module.ir_back.body.0.res_layer.1.weight"] = torch.ones(2, 2)  # wrong shape
    state["module.head.weight"] = torch.ones(3)                        # not backbone
    torch.save(state, tmp_path / "w.pth")
    dst = build_model(small_cfg("qcs")).ir_back
    report = load_backbone_weights(dst, tmp_path / "w.pth")
    assert report.unexpected == ["output_layer.0.weight"]
    assert report.missing == [] and len(report.mismatched) == 1
    assert "body.0.res_layer.1.weight" in report.mismatched[0]
    for k, v in dst.state_dict().items():
        if k != "body.0.res_layer.1.weight":
            torch.testing.assert_close(v, src.state_dict()[k])
    assert "1 shape-mismatched" in str(report)


def test_backbone_weights_safetensors_and_missing(tmp_path):
    from safetensors.torch import save_file
    src = build_model(small_cfg("baseline")).ir_back
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    dst = build_model(small_cfg("baseline")).ir_back
    report = load_backbone_weights(dst, tmp_path / "w.safetensors")
    assert not report.missing and not report.unexpected
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(dst, tmp_path / "nope.pth")


def test_loss_is_mean_of_all_cross_entropies():
    torch.manual_seed(0)
    base, cross = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    labels = torch.tensor([[1, 2, 0]] * 2 + [[4, 4, 3]] * 2)
    loss, parts = qcs_loss(base, cross, labels, QCSConfig())
    ces = [F.cross_entropy(out[r, b:b + 1], labels[r, b:b + 1])
           for out in (base, cross) for r in range(4) for b in range(3)]
    assert math.isclose(float(loss), float(torch.stack(ces).mean()), rel_tol=1e-6)
    assert math.isclose(parts["base"], float(torch.stack(ces[:12]).mean()), rel_tol=1e-6)
    only_base, parts = qcs_loss(base, None, labels, QCSConfig())
    assert "cross" not in parts
    assert math.isclose(float(only_base), float(torch.stack(ces[:12]).mean()), rel_tol=1e-6)


def test_distillation_terms():
    torch.manual_seed(0)
    base, cross = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    labels = torch.zeros(2, 3, dtype=torch.long)
    plain, _ = qcs_loss(base, cross, labels, QCSConfig())
    t = 2.0
    kl, parts = qcs_loss(base, cross, labels,
                         QCSConfig(distill="kl", distill_weight=0.5, temperature=t))
    p = torch.softmax(cross.reshape(-1, 4) / t, -1)
    q = torch.softmax(base.reshape(-1, 4) / t, -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    assert math.isclose(float(kl - plain), 0.5 * float(manual), rel_tol=1e-5)
    mse, _ = qcs_loss(base, cross, labels, QCSConfig(distill="mse", distill_weight=2.0))
    assert math.isclose(float(mse - plain), 2.0 * float(((base - cross) ** 2).mean()), rel_tol=1e-5)
