"""model.init schemes (qcs.models.init): the spread of the weights each one draws."""

from __future__ import annotations

import math

import pytest
import torch
from qcs.models.init import INIT_SCHEMES, init_weights
from torch import nn


def _net() -> nn.Module:
    torch.manual_seed(0)
    frozen = nn.Linear(300, 300)
    frozen.requires_grad_(False)
    net = nn.Sequential(nn.Conv2d(16, 64, 3), nn.LayerNorm(400), nn.Linear(400, 500), frozen)
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[2].bias.fill_(1.0)
    return net


def test_default_leaves_the_weights_as_built():
    a, b = _net(), _net()
    init_weights(b, "default")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("scheme, linear_std", [
    ("published", 0.01),
    ("torch", 1 / math.sqrt(3 * 400)),  # uniform in +-1/sqrt(fan_in): std = bound / sqrt(3)
])
def test_scheme_spreads(scheme, linear_std):
    net = _net()
    frozen_before = net[3].weight.clone()
    torch.manual_seed(1)
    init_weights(net, scheme)
    conv, norm, lin, frozen = net
    # Kaiming normal, fan-out: std = sqrt(2 / (out_channels * kh * kw))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert torch.count_nonzero(conv.bias) == 0
    assert lin.weight.std().item() == pytest.approx(linear_std, rel=0.03)
    if scheme == "published":
        assert torch.count_nonzero(lin.bias) == 0
    else:  # PyTorch's bias: uniform in +-1/sqrt(fan_in)
        assert lin.bias.abs().max().item() <= 1 / math.sqrt(400)
    assert torch.equal(norm.weight, torch.ones(400))
    assert torch.equal(frozen.weight, frozen_before)  # a frozen layer keeps its weights


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match=r"model.init must be one of .*got 'xavier'"):
        init_weights(_net(), "xavier")
    assert INIT_SCHEMES == ("default", "published", "torch")


def test_a_config_with_model_init_round_trips_through_a_checkpoint():
    # model.init sits in [model] beside family / num_classes: a checkpoint's config that has
    # it is of the current layout, not the flat legacy one
    from qcs.config import config_from_dict, load_config, upgrade_legacy
    d = load_config("tiny").to_dict()
    assert d["model"]["init"] == "torch"
    assert upgrade_legacy(d) == {s: {k: v for k, v in vals.items() if v is not None}
                                 for s, vals in d.items()}
    assert config_from_dict(upgrade_legacy(d), "checkpoint").validate().model.init == "torch"
