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
    torch.testing.assert_close(
        out.double().sum(-1),
        torch.ones(qk.shape[:2], device="cuda", dtype=torch.float64),
        atol=5e-3 if dtype in HALF else 1e-5,
        rtol=0,
    )
    out64, g64 = maps_and_grads(
        oracle, qk.double(), None if pair else theta.double(), grad_out, **kw
    )
    low = (
        maps_and_grads(oracle, qk, theta, grad_out, **kw)
        if dtype == torch.float32
        else (None, [None] * len(g))
    )
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
    torch.library.opcheck(
        ops.cross_similarity_backward,
        (torch.randn_like(maps), maps, qk.detach(), dist, ext, theta.detach(), 1.0, "sd", "sample"),
    )
    qk2 = _features(2, 2, 5, 3, torch.float16, seed=8)
    torch.library.opcheck(ops.pair_similarity_forward, (qk2, "batch"))


# ---- the review's GPU risks -------------------------------------------------------------


def test_tf32_switches_do_not_reach_the_gemms():
    """Risk 1: with TF32 switched on globally, float32 results keep float32 accuracy."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        qk = _features(4, 2, 49, 256, torch.float32, seed=11)
        _, dist, _ = ops.cross_similarity_forward(
            qk, torch.tensor(0.3, device="cuda"), 1.0, "sd", "sample"
        )
        q = qk.double()
        exact = torch.cdist(q[1], q[0])
        assert (dist[0].double() - exact).abs().max().item() <= 2e-5 * exact.max().item()
        _check(qk, torch.tensor(0.3, device="cuda"), "sd", "batch")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


def test_subnormal_squared_distances_stay_nonzero():
    """Risk 2: no flush-to-zero: squared distances below 1.2e-38 survive."""
    qk = (1e-20 * _features(4, 2, 5, 3, torch.float64, seed=12)).float()
    _, dist, _ = ops.cross_similarity_forward(
        qk, torch.tensor(0.3, device="cuda"), 1.0, "sd", "sample"
    )
    exact = torch.cdist(qk[1].double(), qk[0].double())
    assert (exact.square() < 1.2e-38).all() and (dist[0] > 0).all()
    torch.testing.assert_close(dist[0].double(), exact, rtol=2e-2, atol=0)


def test_has_fused_kernel_tells_the_truth_and_the_fallback_works():
    """Risk 3: the runtime has an image for this GPU (else has_fused_kernel is False), and
    a device without one gets the reference through the wrappers."""
    from qcs_ext import ops as ops_module

    index = torch.cuda.current_device()
    assert ops.kernel_image_fits(index) is True
    binding = ops_module.IMAGES
    saved = dict(binding._image_cache)
    binding._image_cache[index] = False  # as if the build had no image for this GPU
    try:
        assert not qcs_ext.has_fused_kernel("cuda")
        qk = _features(4, 2, 7, 5, torch.float64, seed=13)
        theta = torch.tensor(0.3, device="cuda", dtype=torch.float64)
        assert torch.equal(
            qcs_ext.cross_similarity_maps(qk, theta), ref.cross_similarity_maps(qk, theta)
        )
    finally:
        binding._image_cache.clear()
        binding._image_cache.update(saved)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_of_20000_small_n(scope, dtype):
    """Risk 4: B > 16383 (4B blocks no longer in gridDim.y)."""
    qk = _features(4, 20000, 3, 8, dtype, seed=14)
    _check(qk, torch.tensor(0.3, device="cuda", dtype=dtype), "sd", scope)


@pytest.mark.parametrize("scope", SCOPES)
def test_large_common_offset(scope):
    """Risk 5: every entry recomputed (a warp each); the backward centred per pair."""
    gen = torch.Generator().manual_seed(15)
    qk = (
        (1000.0 + 0.05 * torch.randn(4, 8, 49, 256, generator=gen, dtype=torch.float64))
        .float()
        .cuda()
    )
    _check(qk, torch.tensor(0.3, device="cuda"), "sd", scope)


def test_cuda_graph_capture():
    """The op (forward and backward) is capturable in a CUDA graph and replays exactly."""
    qk = _features(4, 4, 49, 64, torch.float32, seed=16).requires_grad_(True)
    theta = torch.tensor(0.3, device="cuda", requires_grad=True)
    g = torch.randn(4, 4, 49, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        out = qcs_ext.cross_similarity_maps(qk, theta)
        torch.autograd.grad(out, (qk, theta), g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qcs_ext.cross_similarity_maps(qk, theta)
        gq, gt = torch.autograd.grad(out, (qk, theta), g)
    graph.replay()
    torch.cuda.synchronize()
    expected = qcs_ext.cross_similarity_maps(qk, theta)
    eq, et = torch.autograd.grad(expected, (qk, theta), g)
    assert torch.equal(out, expected) and torch.equal(gq, eq) and torch.equal(gt, et)


def _cuda_kernels(fn):
    """Names of the CUDA kernels that fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_launch_counts_at_the_paper_shape(dtype):
    """At N = 49 (tensor-core path): at most 3 kernels forward (scope "batch") and 4
    backward, and no GEMM library call."""
    qk = _features(4, 24, 49, 768, dtype, seed=17)
    theta = torch.tensor(0.3, device="cuda", dtype=dtype)
    ops = torch.ops.qcs_ext
    ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch")  # warm-up
    fwd = _cuda_kernels(lambda: ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch"))
    maps, dist, ext = ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch")
    g = torch.randn_like(maps)
    bwd = _cuda_kernels(
        lambda: ops.cross_similarity_backward(g, maps, qk, dist, ext, theta, 1.0, "sd", "batch")
    )
    assert len(fwd) <= 3 and len(bwd) <= 4, (fwd, bwd)
    assert not any("gemm" in k.lower() for k in fwd + bwd), (fwd, bwd)


def test_float64_forward_launches_at_the_paper_shape():
    """float64 at N = 49: the distance tiles on CUDA cores, at most 3 kernels forward and
    no GEMM library call (its backward keeps the GEMM path)."""
    qk = _features(4, 24, 49, 768, torch.float64, seed=18)
    theta = torch.tensor(0.3, device="cuda", dtype=torch.float64)
    ops = torch.ops.qcs_ext
    ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch")  # warm-up
    fwd = _cuda_kernels(lambda: ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch"))
    assert len(fwd) <= 3 and not any("gemm" in k.lower() for k in fwd), fwd
