"""qcs_ext.nn modules: the fused backend against the reference backend."""

from __future__ import annotations

import copy

import pytest
import torch

from qcs_ext import nn as qnn


def _pair_of_modules(cls, dim, **kw):
    torch.manual_seed(0)
    fused = cls(dim, backend="fused", **kw).double()
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    return fused, ref


@pytest.mark.parametrize("mode", ["sd", "s", "d"])
@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_cross_similarity_fused_matches_reference(mode, scope):
    fused, ref = _pair_of_modules(qnn.CrossSimilarity, 16, gamma=0.8, mode=mode, scope=scope)
    with torch.no_grad():
        fused.theta.fill_(0.3)
        ref.theta.fill_(0.3)
    x = torch.randn(4, 3, 10, 16, dtype=torch.float64)
    out_f, maps_f = fused(x, return_maps=True)
    out_r, maps_r = ref(x, return_maps=True)
    assert out_f.shape == x.shape and maps_f.shape == (4, 3, 10)
    assert torch.allclose(out_f, out_r, atol=1e-10) and torch.allclose(maps_f, maps_r, atol=1e-12)
    out_f.square().sum().backward()
    out_r.square().sum().backward()
    for (name, p_f), p_r in zip(fused.named_parameters(), ref.parameters()):
        assert p_f.grad is not None, name
        # The reference never touches theta outside mode "sd" (no grad); the op reports 0.
        want = p_r.grad if p_r.grad is not None else torch.zeros_like(p_r)
        assert torch.allclose(p_f.grad, want, atol=1e-9), name
    if mode == "sd":
        assert fused.theta.grad.abs() > 0  # theta is learned in mode "sd"


def test_pair_similarity_fused_matches_reference():
    fused, ref = _pair_of_modules(qnn.PairSimilarity, 8, scope="sample")
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    out_f = fused(x)
    out_r = ref(x)
    assert torch.allclose(out_f, out_r, atol=1e-10)
    (g_f,) = torch.autograd.grad(out_f.sum(), x)
    (g_r,) = torch.autograd.grad(out_r.sum(), x)
    assert torch.allclose(g_f, g_r, atol=1e-9)


def test_module_rejects_bad_input_and_arguments():
    module = qnn.CrossSimilarity(8)
    with pytest.raises(ValueError, match=r"x must have shape \[4, B, N, 8\]"):
        module(torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="built for 8"):
        module(torch.randn(4, 3, 5, 6))
    with pytest.raises(ValueError, match="backend must be one of"):
        qnn.CrossSimilarity(8, backend="cuda")
    with pytest.raises(ValueError, match="mode must be one of"):
        qnn.CrossSimilarity(8, mode="x")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        qnn.PairSimilarity(0)
    with pytest.raises(ValueError, match="residual must be one of"):
        qnn.PairSimilarity(8, residual="pre")


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_input_residual_keeps_the_input_as_stream(backend):
    """``residual="input"``: ``h = x + maps * v``, ``out = h + MLP(LayerNorm2(h))``; the same
    weights with ``"normed"`` compute something else."""
    torch.manual_seed(0)
    module = qnn.PairSimilarity(8, backend=backend, residual="input").double()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out, maps = module(x, return_maps=True)
    _, v = module.qkv(module.norm1(x)).chunk(2, dim=-1)
    h = x + maps.unsqueeze(-1) * v
    assert torch.allclose(out, h + module.mlp(module.norm2(h)), atol=1e-12)
    module.residual = "normed"
    assert not torch.allclose(module(x), out, atol=1e-3)


def test_fused_backend_without_kernel_raises():
    module = qnn.PairSimilarity(4, backend="fused").to("meta")
    with pytest.raises(RuntimeError, match="no fused kernel for meta"):
        module(torch.randn(2, 1, 3, 4, device="meta"))


def test_auto_backend_uses_fused_kernel_on_cpu():
    import qcs_ext

    assert qcs_ext.has_fused_kernel("cpu")
    assert qnn.CrossSimilarity(4)._use_fused(torch.zeros(4, 1, 1, 4))
