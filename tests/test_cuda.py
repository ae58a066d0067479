"""The real CUDA kernels (qcs_ext._C, CUDA dispatch key) against the reference.

Needs a GPU: every test is marked ``cuda`` and skipped without one. The same kernel
sources are tested without a GPU through the emulation layer (test_emulated.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from op_helpers import maps_and_grads

import qcs_ext
from qcs_ext import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODES = ("sd", "s", "d")
SCOPES = ("batch", "sample")
HALF = (torch.float16, torch.bfloat16)
ops = torch.ops.qcs_ext


@pytest.fixture(autouse=True)
def _kernels_built():
    if not qcs_ext.has_fused_kernel("cuda"):
        pytest.fail("a GPU is present but qcs_ext._C was built without the CUDA kernels")


def _features(branches, batch, tokens, channels, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(branches, batch, tokens, channels, generator=gen, dtype=torch.float64)
    return x.to(device="cuda", dtype=dtype)


def _check(qk, theta, mode, scope, pair=False):
    dtype = qk.dtype
    kw = {"scope": scope} if pair else {"mode": mode, "scope": scope}
    fused = qcs_ext.pair_similarity_maps if pair else qcs_ext.cross_similarity_maps
    oracle = ref.pair_similarity_maps if pair else ref.cross_similarity_maps
    grad_out = torch.randn(qk.shape[:3], device="cuda", dtype=torch.float64,
                           generator=torch.Generator("cuda").manual_seed(1))
    out, g = maps_and_grads(fused, qk, theta, grad_out, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().sum(-1), torch.ones(qk.shape[:2], device="cuda", dtype=torch.float64),
                               atol=5e-3 if dtype in HALF else 1e-5, rtol=0)
    out64, g64 = maps_and_grads(oracle, qk.double(), None if pair else theta.double(), grad_out, **kw)
    low = maps_and_grads(oracle, qk, theta, grad_out, **kw) if dtype == torch.float32 else (None, [None] * len(g))
    for name, got, exp, lo in [("maps", out, out64, low[0])] + [
        (f"grad[{i}]", a, b, c) for i, (a, b, c) in enumerate(zip(g, g64, low[1]))
    ]:
        got = got.double()
        scale = exp.abs().max().item() + 1e-30
        err = (got - exp).abs().max().item()
        if dtype == torch.float64:
            assert err <= 1e-10 * max(scale, 1.0), f"{name}: {err}"
        elif dtype == torch.float32:
            ref_err = (lo.double() - exp).abs().max().item()
            assert err <= 2 * ref_err + 1e-5 * max(scale, 1.0), f"{name}: {err} vs ref32 {ref_err}"
        else:
            assert err <= 2e-2 * max(scale, 1e-2), f"{name}: {err} (scale {scale})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
@pytest.mark.parametrize("batch,tokens", [(2, 1), (1, 7), (4, 49), (2, 196), (1, 784)])
def test_cross_matches_reference(dtype, mode, scope, batch, tokens):
    qk = _features(4, batch, tokens, 64, dtype, seed=tokens + batch)
    _check(qk, torch.tensor(0.3, device="cuda", dtype=dtype), mode, scope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("batch,tokens", [(3, 7), (8, 49), (2, 784)])
def test_pair_matches_reference(dtype, scope, batch, tokens):
    _check(_features(2, batch, tokens, 32, dtype, seed=2), None, None, scope, pair=True)


@pytest.mark.parametrize("scope", SCOPES)
def test_zero_distances_and_constant_inputs(scope):
    qk = _features(4, 2, 6, 8, torch.float64, seed=3)
    qk[1] = qk[0]
    qk[3] = qk[2]
    _check(qk, torch.tensor(0.1, device="cuda", dtype=torch.float64), "sd", scope)
    const = torch.full((4, 2, 5, 3), 0.7, device="cuda", dtype=torch.float64)
    _check(const, torch.tensor(0.1, device="cuda", dtype=torch.float64), "sd", scope)


@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
def test_gradcheck(mode, scope):
    qk = _features(4, 2, 5, 3, torch.float64, seed=4).requires_grad_(True)
    theta = torch.tensor(0.2, device="cuda", dtype=torch.float64, requires_grad=True)
    fn = lambda q, t: qcs_ext.cross_similarity_maps(q, t, gamma=0.8, mode=mode, scope=scope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, theta), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens", [49, 784])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(tokens, dtype):
    qk = _features(4, 4, tokens, 64, dtype, seed=5).requires_grad_(True)
    theta = torch.tensor(0.3, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(4, 4, tokens, device="cuda", dtype=dtype)
    runs = []
    for _ in range(3):
        out = qcs_ext.cross_similarity_maps(qk, theta)
        runs.append((out, *torch.autograd.grad(out, (qk, theta), g)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_no_host_sync_and_side_stream():
    qk = _features(4, 2, 49, 32, torch.float32, seed=6).requires_grad_(True)
    theta = torch.tensor(0.3, device="cuda", requires_grad=True)
    expected = qcs_ext.cross_similarity_maps(qk, theta)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            out = qcs_ext.cross_similarity_maps(qk, theta)
            grads = torch.autograd.grad(out.square().sum(), (qk, theta))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert torch.equal(out, expected)
    assert all(torch.isfinite(x).all() for x in grads)


def test_opcheck():
    qk = _features(4, 2, 5, 3, torch.float32, seed=7).requires_grad_(True)
    theta = torch.tensor(0.3, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.cross_similarity_forward, (qk, theta, 1.0, "sd", "batch"))
    maps, dist, ext = ops.cross_similarity_forward(qk.detach(), theta.detach(), 1.0, "sd", "sample")
    torch.library.opcheck(ops.cross_similarity_backward,
                          (torch.randn_like(maps), maps, qk.detach(), dist, ext, theta.detach(), 1.0, "sd", "sample"))
    qk2 = _features(2, 2, 5, 3, torch.float16, seed=8)
    torch.library.opcheck(ops.pair_similarity_forward, (qk2, "batch"))
