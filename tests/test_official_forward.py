"""The published QCS / DCS / baseline networks, computed independently of our modules.

A random checkpoint in the authors' format (their key names, ``module.`` prefixes,
optimizer state, a recorder pickled from ``__main__``) is converted with ``qcs convert``
and run through our network; the reference is a plain ``torch.nn.functional`` forward
driven by the official key names, written from the authors' model files
(``models/ir50.py``, ``models/vit_model_*.py``, ``models/QCS_*.py``, ``models/DCS_*.py``
and ``utils.py`` of github.com/birdwcp/QCS). Nothing of ``qcs`` or ``qcs_ext`` is used by
the reference. In float64 and eval mode the logits must agree to 1e-10 (relative to the
largest logit): inference ``model(x)`` and the training forward (base and cross logits of
every branch), for QCS, DCS (7 and 8 classes: the 8-class DCS modules keep their input
as the residual) and the baseline.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qcs.cli import main
from qcs.inference import load_model

# a small network with the published structure: IR50 units (stem width = stage-1 width,
# so body1.0 has the max-pool shortcut), 32 px inside the backbone -> maps 16/8/4 ->
# conv s2 -> 8/4/2 -> embed_q two s2 convs, embed_k one, embed_v a 1x1: 2x2 tokens per level
DEPTHS, WIDTHS, SIZE, DIM, HEADS = (2, 2, 3), (8, 12, 16), 32, 16, 8  # 8 heads: hard-coded
SIDE = SIZE // 16
TOKENS = 3 * SIDE * SIDE
GEOMETRY = [f"qcs.backbone_depths={list(DEPTHS)}", f"qcs.backbone_widths={list(WIDTHS)}",
            f"qcs.backbone_size={SIZE}", f"qcs.tokens_side={SIDE}", f"qcs.embed_dim={DIM}",
            f"qcs.heads={HEADS}", "qcs.vit_depth=2", "qcs.vit_cross_depth=1",
            "qcs.mlp_ratio=4.0", "qcs.csa_scope=batch", "qcs.csa_gamma=1.0",
            "qcs.csa_mode=sd", "qcs.backend=reference", f"data.image_size={2 * SIZE}"]
TOL = 1e-10


# ------------------------------------------------------------------ the official file


def _bn(prefix: str, ch: int) -> dict[str, tuple]:
    return {f"{prefix}.{k}": (ch,) for k in ("weight", "bias", "running_mean", "running_var")}


def _backbone_shapes() -> dict[str, tuple]:
    shapes = {"ir_back.input_layer.0.weight": (WIDTHS[0], 3, 3, 3),
              **_bn("ir_back.input_layer.1", WIDTHS[0]),
              "ir_back.input_layer.2.weight": (WIDTHS[0],)}
    in_ch = WIDTHS[0]
    for s, (depth, out) in enumerate(zip(DEPTHS, WIDTHS), start=1):
        for j in range(depth):
            p = f"ir_back.body{s}.{j}"
            if in_ch != out:
                shapes[f"{p}.shortcut_layer.0.weight"] = (out, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.shortcut_layer.1", out))
            shapes.update(_bn(f"{p}.res_layer.0", in_ch))
            shapes[f"{p}.res_layer.1.weight"] = (out, in_ch, 3, 3)
            shapes[f"{p}.res_layer.2.weight"] = (out,)
            shapes[f"{p}.res_layer.3.weight"] = (out, out, 3, 3)
            shapes.update(_bn(f"{p}.res_layer.4", out))
            in_ch = out
    return shapes


def _embed_shapes(new_names: bool) -> dict[str, tuple]:
    e1, e2, e3 = ("embed_1", "embed_2", "embed_3") if new_names else ("embed_q", "embed_k",
                                                                      "embed_v")
    shapes = {}
    for level, w in enumerate(WIDTHS, start=1):
        shapes[f"conv{level}.weight"], shapes[f"conv{level}.bias"] = (w, w, 3, 3), (w,)
    for name, shape in (
        (f"{e1}.0", (DIM, WIDTHS[0], 3, 3)),
        (f"{e1}.1", (DIM, DIM, 3, 3)),
        (f"{e2}.0", (DIM, WIDTHS[1], 3, 3)),
        (f"{e3}.proj", (DIM, WIDTHS[2], 1, 1)),
    ):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, (DIM,)
    return shapes


def _vit_shapes(prefix: str, depth: int, classes: int) -> dict[str, tuple]:
    shapes = {f"{prefix}.cls_token": (1, 1, DIM), f"{prefix}.pos_embed": (1, TOKENS + 1, DIM)}
    linears = {
        "se_block.linear1": (DIM, DIM),
        "se_block.linear2": (DIM, DIM),
        "head.linear": (classes, DIM),
        "norm": None,
    }
    for i in range(depth):
        linears.update(
            {
                f"blocks.{i}.norm1": None,
                f"blocks.{i}.norm2": None,
                f"blocks.{i}.attn.qkv": (3 * DIM, DIM),
                f"blocks.{i}.attn.proj": (DIM, DIM),
                f"blocks.{i}.mlp.fc1": (4 * DIM, DIM),
                f"blocks.{i}.mlp.fc2": (DIM, 4 * DIM),
                f"blocks.{i}.conv": (TOKENS + 1, TOKENS + 1, 1),
            }
        )  # unused Conv1d
    for name, shape in linears.items():
        shapes[f"{prefix}.{name}.weight"] = shape or (DIM,)
        shapes[f"{prefix}.{name}.bias"] = (shape[0],) if shape else (DIM,)
    # modules the official ViT holds but never calls (real names, small shapes)
    shapes.update(
        {
            f"{prefix}.patch_embed.proj.weight": (4, 3, 1, 1),
            f"{prefix}.eca_block.conv.weight": (1, 1, 3),
            f"{prefix}.CON1.weight": (4, 3, 1, 1),
            f"{prefix}.IRLinear1.weight": (3, 4),
        }
    )
    return shapes


def _cross_shapes(variant: str) -> dict[str, tuple]:
    shapes = {}
    for level in (1, 2, 3):
        p = f"cross_attention_{level}"
        shapes.update(
            {
                f"{p}.norm1.weight": (DIM,),
                f"{p}.norm1.bias": (DIM,),
                f"{p}.norm2.weight": (DIM,),
                f"{p}.norm2.bias": (DIM,),
                f"{p}.proj.weight": (2 * DIM, DIM),
                f"{p}.proj.bias": (2 * DIM,),
                f"{p}.mlp.fc1.weight": (4 * DIM, DIM),
                f"{p}.mlp.fc1.bias": (4 * DIM,),
                f"{p}.mlp.fc2.weight": (DIM, 4 * DIM),
                f"{p}.mlp.fc2.bias": (DIM,),
            }
        )
        if variant == "qcs":
            shapes[f"{p}.theta"] = ()
    return shapes


def _random_value(key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Values away from every initial value: BN statistics, PReLU slopes, LayerNorm
    scales and theta included; weights scaled by fan-in so activations stay O(1)."""
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith("theta"):
        return torch.tensor(0.3)
    if key.endswith(("res_layer.2.weight", "input_layer.2.weight")):
        return torch.rand(shape, generator=gen) * 0.5  # PReLU slopes (default 0.25)
    if len(shape) == 1 and key.endswith(".weight"):
        return 1 + 0.2 * torch.randn(shape, generator=gen)  # BN / LayerNorm scales
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def official_state(
    variant: str, classes: int, *, new_names: bool = False, fusion: bool = False, seed: int = 0
) -> OrderedDict:
    """A random state dict with the official key names (no ``module.`` prefix)."""
    shapes = {
        **_backbone_shapes(),
        **_embed_shapes(new_names),
        **_vit_shapes("VIT_base", 2, classes),
        "ir_back.output_layer.0.weight": (4,),
        "ir_back.output_layer.3.weight": (4, 6),
    }
    if variant != "baseline":
        shapes.update({**_vit_shapes("VIT_cross", 1, classes), **_cross_shapes(variant)})
    if fusion:  # the 8-class DCS AffectNet model builds an (unused) bilinear classifier
        shapes.update(
            {"fusion.classifier.weight": (classes, DIM * DIM), "fusion.classifier.bias": (classes,)}
        )
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict((k, _random_value(k, s, gen)) for k, s in shapes.items())
    for k in [k for k in state if k.endswith("running_var")]:
        state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(1234)
    return state


class RecorderMeter_matrix:
    """Like the authors' recorder: a plain object holding numpy arrays."""

    def __init__(self) -> None:
        self.epoch_losses = np.zeros((3, 2), dtype=np.float32)


def save_official(path, state: OrderedDict, monkeypatch) -> None:
    """``torch.save`` as the authors' training scripts do (DataParallel keys, optimizer
    state, recorder object from ``__main__``)."""
    monkeypatch.setattr(
        sys.modules["__main__"], "RecorderMeter_matrix", RecorderMeter_matrix, raising=False
    )
    monkeypatch.setattr(RecorderMeter_matrix, "__module__", "__main__")
    params = [torch.nn.Parameter(v.clone()) for v in list(state.values())[:3]]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save(
        {
            "epoch": 12,
            "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items()),
            "best_acc": torch.tensor(88.5),
            "optimizer": opt.state_dict(),
            "recorder_m": RecorderMeter_matrix(),
        },
        path,
    )


# ------------------------------------------------------- the official forward, functional


def _batch_norm(x, p, prefix):
    return F.batch_norm(
        x,
        p[f"{prefix}.running_mean"],
        p[f"{prefix}.running_var"],
        p[f"{prefix}.weight"],
        p[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _ir_unit(x, p, prefix, stride):
    if f"{prefix}.shortcut_layer.0.weight" in p:
        short = F.conv2d(x, p[f"{prefix}.shortcut_layer.0.weight"], stride=stride)
        short = _batch_norm(short, p, f"{prefix}.shortcut_layer.1")
    else:
        short = F.max_pool2d(x, 1, stride)
    res = _batch_norm(x, p, f"{prefix}.res_layer.0")
    res = F.conv2d(res, p[f"{prefix}.res_layer.1.weight"], stride=1, padding=1)
    res = F.prelu(res, p[f"{prefix}.res_layer.2.weight"])
    res = F.conv2d(res, p[f"{prefix}.res_layer.3.weight"], stride=stride, padding=1)
    return _batch_norm(res, p, f"{prefix}.res_layer.4") + short


def official_backbone(x, p):
    """``Backbone.forward``: nearest resize (``F.interpolate``'s default), stem, body1..3."""
    x = F.interpolate(x, size=SIZE)
    x = F.conv2d(x, p["ir_back.input_layer.0.weight"], stride=1, padding=1)
    x = F.prelu(_batch_norm(x, p, "ir_back.input_layer.1"), p["ir_back.input_layer.2.weight"])
    outs = []
    for s, depth in enumerate(DEPTHS, start=1):
        for j in range(depth):
            x = _ir_unit(x, p, f"ir_back.body{s}.{j}", 2 if j == 0 else 1)
        outs.append(x)
    return outs


def _conv(x, p, name, stride, padding):
    return F.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], stride=stride, padding=padding)


def official_tokens(x, p):
    """conv1..3 (3x3 s2), then embed_q (two 3x3 s2), embed_k (one), embed_v (1x1)."""
    names = (
        ("embed_1", "embed_2", "embed_3")
        if "embed_1.0.weight" in p
        else ("embed_q", "embed_k", "embed_v")
    )
    f1, f2, f3 = (
        _conv(f, p, f"conv{i}", 2, 1) for i, f in enumerate(official_backbone(x, p), start=1)
    )
    o1 = _conv(_conv(f1, p, f"{names[0]}.0", 2, 1), p, f"{names[0]}.1", 2, 1)
    o2 = _conv(f2, p, f"{names[1]}.0", 2, 1)
    o3 = _conv(f3, p, f"{names[2]}.proj", 1, 0)
    return torch.cat([o.flatten(2).transpose(1, 2) for o in (o1, o2, o3)], dim=1)


def _linear(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def _layer_norm(x, p, name, eps):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=eps)


def _vit_block(x, p, prefix):
    b, n, c = x.shape
    h = _layer_norm(x, p, f"{prefix}.norm1", 1e-6)
    qkv = _linear(h, p, f"{prefix}.attn.qkv").reshape(b, n, 3, 8, c // 8).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // 8) ** -0.5, dim=-1)
    x = x + _linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), p, f"{prefix}.attn.proj")
    h = _layer_norm(x, p, f"{prefix}.norm2", 1e-6)
    return x + _linear(F.gelu(_linear(h, p, f"{prefix}.mlp.fc1")), p, f"{prefix}.mlp.fc2")


def official_vit(tokens, p, prefix):
    """``VisionTransformer.forward``: (logits, patch tokens after the final LayerNorm)."""
    x = torch.cat([p[f"{prefix}.cls_token"].expand(tokens.shape[0], -1, -1), tokens], dim=1)
    x = x + p[f"{prefix}.pos_embed"]
    depth = len({k.split(".")[2] for k in p if k.startswith(f"{prefix}.blocks.")})
    for i in range(depth):
        x = _vit_block(x, p, f"{prefix}.blocks.{i}")
    x = _layer_norm(x, p, f"{prefix}.norm", 1e-6)
    cls = x[:, 0]
    gate = torch.sigmoid(
        _linear(
            F.relu(_linear(cls, p, f"{prefix}.se_block.linear1")), p, f"{prefix}.se_block.linear2"
        )
    )
    return _linear(cls * gate, p, f"{prefix}.head.linear"), x[:, 1:]


def _shift_similarity(d):
    """``D - min(D)`` and ``S = max(D') - D'`` over the whole tensor (all samples)."""
    d = d - torch.min(d)
    return d, torch.max(d) - d


def official_qcs_maps(qk1, qk2, qk3, qk4, theta):
    """``Attn_QCS_SD`` with ``k = tanh(theta)`` (the function adds 1)."""
    k = torch.tanh(theta) + 1
    _, s21 = _shift_similarity(torch.cdist(qk2, qk1))
    _, s43 = _shift_similarity(torch.cdist(qk4, qk3))
    d31, _ = _shift_similarity(torch.cdist(qk3, qk1))
    d42, _ = _shift_similarity(torch.cdist(qk4, qk2))
    m1 = F.normalize(s21, dim=2).sum(1) + k * F.normalize(d31, dim=2).sum(1)
    m4 = F.normalize(s43, dim=1).sum(2) + k * F.normalize(d42, dim=1).sum(2)
    m2 = F.normalize(s21.transpose(1, 2), dim=2).sum(1) + k * F.normalize(d42, dim=2).sum(1)
    m3 = F.normalize(s43.transpose(1, 2), dim=1).sum(2) + k * F.normalize(d31, dim=1).sum(2)
    return [torch.softmax(m, dim=-1) for m in (m1, m2, m3, m4)]


def official_dcs_maps(k1, q2):
    """``Attn_DCS_S(K1, Q2)``: the maps of the anchor and of the positive."""
    _, s = _shift_similarity(torch.cdist(q2, k1))
    return [
        torch.softmax(F.normalize(s, dim=2).sum(1), dim=-1),
        torch.softmax(F.normalize(s, dim=1).sum(2), dim=-1),
    ]


def official_cross(xs, p, prefix, keeps_input):
    """``CrossAttention.forward`` on the branches' tokens of one level. ``keeps_input``:
    the 8-class DCS form (the residual stream is the input, not its LayerNorm)."""
    hs = [_layer_norm(x, p, f"{prefix}.norm1", 1e-5) for x in xs]
    qkv = [_linear(h, p, f"{prefix}.proj").reshape(*h.shape[:2], 2, h.shape[-1]) for h in hs]
    qk, v = [t[:, :, 0] for t in qkv], [t[:, :, 1] for t in qkv]
    if len(xs) == 4:
        maps = official_qcs_maps(*qk, p[f"{prefix}.theta"])
    else:
        maps = official_dcs_maps(qk[0], qk[1])
    outs = []
    for x, h, m, val in zip(xs, hs, maps, v):
        y = (x if keeps_input else h) + m.unsqueeze(-1) * val
        z = _layer_norm(y, p, f"{prefix}.norm2", 1e-5)
        mlp = _linear(F.gelu(_linear(z, p, f"{prefix}.mlp.fc1")), p, f"{prefix}.mlp.fc2")
        outs.append((y if keeps_input else z) + mlp)
    return outs


def official_forward(images, p, keeps_input=False):
    """``pyramid_trans_expr.forward(*images)``: base logits of every branch, then (with a
    cross branch) the cross logits of every branch, in branch order."""
    base, patches = zip(*(official_vit(official_tokens(x, p), p, "VIT_base") for x in images))
    if "VIT_cross.head.linear.weight" not in p or len(images) == 1:
        return list(base), []
    n = SIDE * SIDE
    levels = [
        official_cross(
            [t[:, i * n : (i + 1) * n] for t in patches], p, f"cross_attention_{i + 1}", keeps_input
        )
        for i in range(3)
    ]
    cross = [
        official_vit(t + torch.cat([lv[r] for lv in levels], dim=1), p, "VIT_cross")[0]
        for r, t in enumerate(patches)
    ]
    return list(base), cross


# ------------------------------------------------------------------------------ the tests


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


CASES = [  # variant, classes, --data, new names, fusion (DCS AffectNet-8), 8-class DCS form
    ("qcs", 7, "raf-db", False, False, False),
    ("qcs", 8, "ferplus", True, False, False),
    ("dcs", 7, "raf-db", False, False, False),
    ("dcs", 8, "ferplus", True, False, True),
    ("dcs", 8, "affectnet8", False, True, True),
    ("baseline", 7, "raf-db", False, False, False),
]


@pytest.mark.parametrize(
    "variant, classes, data, new_names, fusion, keeps_input",
    CASES,
    ids=[f"{c[0]}-{c[2]}" for c in CASES],
)
def test_converted_checkpoint_computes_the_official_network(
    tmp_path, monkeypatch, capsys, variant, classes, data, new_names, fusion, keeps_input
):
    state = official_state(variant, classes, new_names=new_names, fusion=fusion)
    save_official(tmp_path / "official.pth", state, monkeypatch)
    sets = [a for s in GEOMETRY for a in ("--set", s)]
    assert (
        main(
            [
                "convert",
                str(tmp_path / "official.pth"),
                str(tmp_path / "ours"),
                "--config",
                "tiny",
                "--data",
                data,
                *sets,
            ]
        )
        == 0
    )
    assert f"{variant} network, {classes} classes" in capsys.readouterr().out
    p = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 3, 2 * SIZE, 2 * SIZE, generator=gen, dtype=torch.float64)
    branches = {"qcs": 4, "dcs": 2, "baseline": 1}[variant]
    ref_base, ref_cross = official_forward(list(images[:branches]), p, keeps_input)

    with torch.no_grad():  # inference: the base network alone
        infer = load_model(tmp_path / "ours").model.double()
        errors = {"inference": _rel(infer(images[0]), ref_base[0])}
        full = load_model(tmp_path / "ours", full=variant != "baseline").model.double()
        out = full.forward_branches(images[:branches])
        base, cross = out.logits, out.cross
    errors.update({f"base[{r}]": _rel(base[r], ref_base[r]) for r in range(branches)})
    if variant == "baseline":
        assert cross is None
    else:
        errors.update({f"cross[{r}]": _rel(cross[r], ref_cross[r]) for r in range(branches)})
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, (
        f"logits differ from the official network by up to {errors[worst]:.3g} ({worst}): {errors}"
    )


def test_the_reference_is_sensitive_to_what_it_checks():
    """The independent forward is not blind: the resize, theta and the 8-class DCS residual
    each move its logits far beyond the tolerance."""
    state = official_state("qcs", 7)
    p = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    images = list(
        torch.randn(
            4,
            2,
            3,
            2 * SIZE,
            2 * SIZE,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(2),
        )
    )
    base, cross = official_forward(images, p)
    p_theta = dict(
        p,
        **{
            f"cross_attention_{i}.theta": torch.tensor(-0.4, dtype=torch.float64) for i in (1, 2, 3)
        },
    )
    assert _rel(official_forward(images, p_theta)[1][0], cross[0]) > 1e-6
    assert _rel(official_forward(images, p, keeps_input=True)[1][0], cross[0]) > 1e-3
    smooth = [F.interpolate(x, size=SIZE, mode="bilinear", antialias=True) for x in images]
    assert _rel(official_forward(smooth, p)[0][0], base[0]) > 1e-3


def test_backbone_initialised_from_a_published_checkpoint(tmp_path, monkeypatch):
    """The RAF-DB QCS script starts its backbone from the QCS AffectNet-8 checkpoint: its
    ``ir_back`` weights load into our IR50 (per-stage ``body1..3`` names, or through a
    converted checkpoint) and compute the official backbone."""
    from qcs.models.ir50 import IR50, load_backbone_weights

    state = official_state("qcs", 8)
    torch.save(
        {"state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())},
        tmp_path / "tensors.pth",
    )
    save_official(tmp_path / "official.pth", state, monkeypatch)
    sets = [a for s in GEOMETRY for a in ("--set", s)]
    assert (
        main(
            [
                "convert",
                str(tmp_path / "official.pth"),
                str(tmp_path / "conv"),
                "--config",
                "tiny",
                "--data",
                "affectnet8",
                *sets,
            ]
        )
        == 0
    )
    p = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    x = torch.randn(2, 3, 2 * SIZE, 2 * SIZE, dtype=torch.float64)
    ref = official_backbone(x, p)
    for source in ("tensors.pth", "conv.safetensors"):
        backbone = IR50(DEPTHS, WIDTHS, SIZE).double().eval()
        report = load_backbone_weights(backbone, tmp_path / source)
        assert not report.missing and not report.mismatched, str(report)
        with torch.no_grad():
            for ours, theirs in zip(backbone(x), ref):
                assert _rel(ours, theirs) < TOL, source


def test_checkpoints_without_the_resize_field_keep_their_resize(tmp_path, monkeypatch):
    """A checkpoint our trainer wrote before ``model.backbone_resize`` existed was trained
    with the antialiased resize and is still evaluated with it; a converted one (which has
    ``converted_from``) is the published network: nearest."""
    import json

    from qcs.checkpoint import read_metadata

    save_official(tmp_path / "official.pth", official_state("baseline", 7), monkeypatch)
    sets = [a for s in GEOMETRY for a in ("--set", s)]
    assert (
        main(
            [
                "convert",
                str(tmp_path / "official.pth"),
                str(tmp_path / "ours"),
                "--config",
                "tiny",
                *sets,
            ]
        )
        == 0
    )
    path = tmp_path / "ours.json"
    meta = json.loads(path.read_text())
    assert meta["config"]["qcs"]["backbone_resize"] == "nearest"
    del meta["config"]["qcs"]["backbone_resize"]
    path.write_text(json.dumps(meta))
    assert read_metadata(tmp_path / "ours")["config"]["qcs"]["backbone_resize"] == "nearest"
    del meta["converted_from"]
    path.write_text(json.dumps(meta))
    assert read_metadata(tmp_path / "ours")["config"]["qcs"]["backbone_resize"] == "antialias"
    assert load_model(tmp_path / "ours").model.ir_back.resize == "antialias"
