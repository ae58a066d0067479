"""The fused CPU ops against the plain-PyTorch reference (shared/spec/csa.md)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import qcs_ext
from qcs_ext import reference
from qcs_ext.memory import saved_tensor_bytes

MODES = ("sd", "s", "d")
SCOPES = ("batch", "sample")
# (B, N, C): N = 1 and B = 1 edge cases, partial vectors in N and C, large C.
SHAPES = [(1, 1, 1), (1, 7, 5), (3, 7, 5), (2, 17, 33), (2, 49, 64), (2, 5, 1000)]


def _available_isas() -> list[str]:
    isas = ["baseline"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags and " fma " in flags:
        isas.append("avx2")
    if all(f" {f} " in flags for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq")):
        isas.append("avx512")
    return isas


@pytest.fixture(params=_available_isas())
def cpu_isa(request, monkeypatch):
    """Run the test once per instruction set the CPU kernels were built for."""
    monkeypatch.setenv("QCS_CPU_ISA", request.param)
    assert torch.ops.qcs_ext.cpu_isa() == request.param
    return request.param


def _inputs(shape, dtype, seed=0, theta=0.3):
    gen = torch.Generator().manual_seed(seed)
    b, n, c = shape
    qk = torch.randn(4, b, n, c, generator=gen, dtype=torch.float64).to(dtype)
    return qk.requires_grad_(True), torch.tensor(theta, dtype=dtype, requires_grad=True)


def _grads(fn, qk, theta, upstream, **kw):
    out = fn(qk, theta, **kw)
    grads = torch.autograd.grad(out, (qk, theta), upstream, allow_unused=True)
    grad_theta = grads[1] if grads[1] is not None else torch.zeros_like(theta)
    return out.detach(), grads[0], grad_theta


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-300)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_float64_matches_reference(shape, mode, scope, cpu_isa):
    qk, theta = _inputs(shape, torch.float64)
    upstream = torch.randn(4, *shape[:2], dtype=torch.float64)
    fused = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream, mode=mode, scope=scope)
    ref = _grads(reference.cross_similarity_maps, qk, theta, upstream, mode=mode, scope=scope)
    assert _rel_err(fused[0], ref[0]) < 1e-10
    assert (fused[1] - ref[1]).abs().max() <= 1e-10 * max(ref[1].abs().max().item(), 1e-12)
    assert (fused[2] - ref[2]).abs() <= 1e-10 * max(ref[2].abs().item(), 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_float32_error_within_twice_reference_error(shape, mode, scope, cpu_isa):
    _assert_float32_error_within_twice_reference_error(shape, mode=mode, scope=scope)


def _assert_float32_error_within_twice_reference_error(shape, **kw):
    """Flash-attention style: the kernel's error against a float64 reference is at most
    twice the float32 reference's own error (plus a small floor)."""
    qk32, theta32 = _inputs(shape, torch.float32)
    qk64 = qk32.detach().double().requires_grad_(True)
    theta64 = theta32.detach().double().requires_grad_(True)
    upstream = torch.randn(4, *shape[:2], dtype=torch.float32)
    fused = _grads(qcs_ext.cross_similarity_maps, qk32, theta32, upstream, **kw)
    ref32 = _grads(reference.cross_similarity_maps, qk32, theta32, upstream, **kw)
    ref64 = _grads(reference.cross_similarity_maps, qk64, theta64, upstream.double(), **kw)
    for got, low, exact, floor in zip(fused, ref32, ref64, (1e-6, 1e-5, 1e-5)):
        scale = max(exact.abs().max().item(), 1.0)
        kernel_err = (got.double() - exact).abs().max().item()
        ref_err = (low.double() - exact).abs().max().item()
        assert kernel_err <= 2 * ref_err + floor * scale, (kernel_err, ref_err)


# Gradients of 4 MB and more are stored non-temporally where every row is vector-aligned
# (C = 768); with C = 1001 the rows are not, and the same size takes plain stores.
@pytest.mark.parametrize("shape", [(4, 49, 768), (4, 40, 1001)])
def test_large_gradients_match_reference(shape, cpu_isa):
    qk, theta = _inputs(shape, torch.float64)
    assert qk.numel() * qk.element_size() >= 4 << 20  # above the streaming threshold
    upstream = torch.randn(4, *shape[:2], dtype=torch.float64)
    fused = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream)
    ref = _grads(reference.cross_similarity_maps, qk, theta, upstream)
    for got, want in zip(fused, ref):
        assert (got - want).abs().max() <= 1e-10 * max(want.abs().max().item(), 1e-12)


@pytest.mark.parametrize("scope", SCOPES)
def test_paper_shape_float32_error_within_twice_reference_error(scope, cpu_isa):
    """The paper's shape in float32: a 14 MB gradient, streamed."""
    _assert_float32_error_within_twice_reference_error((24, 49, 768), scope=scope)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("shape", [(1, 1, 2), (1, 6, 3), (2, 5, 4), (3, 9, 17)])
def test_pair_matches_reference(shape, scope, cpu_isa):
    gen = torch.Generator().manual_seed(1)
    qk2 = torch.randn(2, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, *shape[:2], dtype=torch.float64)
    out = qcs_ext.pair_similarity_maps(qk2, scope=scope)
    (grad,) = torch.autograd.grad(out, qk2, upstream)
    ref = reference.pair_similarity_maps(qk2, scope=scope)
    (ref_grad,) = torch.autograd.grad(ref, qk2, upstream)
    assert _rel_err(out, ref) < 1e-10
    assert (grad - ref_grad).abs().max() <= 1e-10 * max(ref_grad.abs().max().item(), 1e-12)


def _special_inputs(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    qk = torch.randn(4, 2, 6, 5, generator=gen, dtype=torch.float64)
    if kind == "duplicated":
        # Zero distances inside the same-class matrices (p ~ a, n2 ~ n), away from the
        # extremes, and tokens repeated within a branch (tied rows and columns).
        qk[1, :, 2] = qk[0, :, 4]
        qk[3, :, 0] = qk[2, :, 1]
        qk[0, :, 5] = qk[0, :, 3]
    elif kind == "constant":
        qk = torch.full_like(qk, 0.25)  # every matrix all zero: the 1e-12 clamp path
    elif kind == "single_token":
        qk = qk[:, :, :1].contiguous()
    elif kind == "single_sample":
        qk = qk[:, :1].contiguous()
    return qk.requires_grad_(True)


@pytest.mark.parametrize("kind", ["random", "duplicated", "constant", "single_token", "single_sample"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_gradcheck(kind, mode, scope):
    qk = _special_inputs(kind)
    theta = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, t: qcs_ext.cross_similarity_maps(q, t, gamma=0.7, mode=mode, scope=scope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, theta))


@pytest.mark.parametrize("kind", ["random", "duplicated", "constant", "single_token"])
@pytest.mark.parametrize("scope", SCOPES)
def test_pair_gradcheck(kind, scope):
    qk2 = _special_inputs(kind)[:2].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: qcs_ext.pair_similarity_maps(q, scope=scope), (qk2,))


@pytest.mark.parametrize("kind", ["duplicated", "constant"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_special_inputs_match_reference(kind, mode, scope):
    qk = _special_inputs(kind)
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, *qk.shape[1:3], dtype=torch.float64)
    fused = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream, mode=mode, scope=scope)
    ref = _grads(reference.cross_similarity_maps, qk, theta, upstream, mode=mode, scope=scope)
    for got, want in zip(fused, ref):
        assert (got - want).abs().max() <= 1e-10 * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_rows_sum_to_one_and_finite(dtype, scale):
    qk, theta = _inputs((3, 11, 9), dtype)
    maps = qcs_ext.cross_similarity_maps(qk.detach() * scale, theta.detach())
    assert torch.isfinite(maps).all()
    assert torch.allclose(maps.sum(-1), torch.ones((), dtype=dtype), atol=1e-5)
    ref = reference.cross_similarity_maps(qk.detach() * scale, theta.detach())
    assert torch.allclose(maps, ref, rtol=1e-3, atol=1e-5)


def test_results_do_not_depend_on_thread_count():
    qk, theta = _inputs((6, 30, 40), torch.float32)
    upstream = torch.randn(4, 6, 30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream)
        torch.set_num_threads(max(2, threads))
        many = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_strided_and_expanded_inputs():
    base = torch.randn(4, 3, 8, 12, dtype=torch.float64)
    theta = torch.tensor(0.1, dtype=torch.float64)
    strided = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not strided.is_contiguous()
    assert torch.allclose(
        qcs_ext.cross_similarity_maps(strided, theta), reference.cross_similarity_maps(base, theta)
    )
    expanded = base[:, :1].expand(4, 3, 8, 12)  # stride 0 over the batch
    leaf = base[:, :1].clone().requires_grad_(True)
    out = qcs_ext.cross_similarity_maps(leaf.expand(4, 3, 8, 12), theta)
    ref = reference.cross_similarity_maps(expanded, theta)
    assert torch.allclose(out, ref)
    out.sum().backward()  # gradient flows back through the expand
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape


def test_half_precision_inputs_compute_in_float32():
    qk, theta = _inputs((2, 9, 16), torch.float32)
    maps = qcs_ext.cross_similarity_maps(qk.detach().bfloat16(), theta.detach().bfloat16())
    assert maps.dtype == torch.bfloat16
    ref = reference.cross_similarity_maps(qk.detach().bfloat16().float(), theta.detach())
    assert torch.allclose(maps.float(), ref, atol=1e-2)


def test_saved_tensors_are_small():
    """Backward keeps qk (an input, not a copy), the maps, the distance matrices and the
    extrema: at N = C that is the input's size plus a few percent."""
    qk, theta = _inputs((4, 64, 64), torch.float32)
    extra = saved_tensor_bytes(qcs_ext.cross_similarity_maps, (qk, theta))
    input_bytes = qk.numel() * qk.element_size()
    assert 0 < extra <= 1.1 * input_bytes, (extra, input_bytes)


@pytest.mark.parametrize("kind", ["random", "duplicated", "constant", "single_token", "single_sample"])
@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
def test_opcheck_cross(kind, mode, scope):
    qk = _special_inputs(kind)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.qcs_ext.cross_similarity_forward.default, (qk, theta, 0.5, mode, scope)
    )
    maps, dist, ext = torch.ops.qcs_ext.cross_similarity_forward(qk.detach(), theta.detach(), 0.5, mode, scope)
    torch.library.opcheck(
        torch.ops.qcs_ext.cross_similarity_backward.default,
        (torch.randn_like(maps), maps, qk.detach(), dist, ext, theta.detach(), 0.5, mode, scope),
    )


@pytest.mark.parametrize("scope", SCOPES)
def test_opcheck_pair(scope):
    qk2 = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.qcs_ext.pair_similarity_forward.default, (qk2, scope))
    maps, dist, ext = torch.ops.qcs_ext.pair_similarity_forward(qk2.detach(), scope)
    torch.library.opcheck(
        torch.ops.qcs_ext.pair_similarity_backward.default,
        (torch.randn_like(maps), maps, qk2.detach(), dist, ext, scope),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    qk, theta = _inputs((2, 7, 6), torch.float64)

    def loss(q, t):
        quad = qcs_ext.cross_similarity_maps(q, t, mode="sd", scope="batch")
        pair = qcs_ext.pair_similarity_maps(q[:2], scope="sample")
        return (quad * quad).sum() + (pair[0] * 3).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    got = compiled(qk, theta)
    got_grads = torch.autograd.grad(got, (qk, theta))
    want = loss(qk, theta)
    want_grads = torch.autograd.grad(want, (qk, theta))
    assert torch.allclose(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b)


# ---- bad input ---------------------------------------------------------------------------

GOOD_QK = torch.randn(4, 2, 3, 5)
GOOD_THETA = torch.zeros(())


@pytest.mark.parametrize("fn", [qcs_ext.cross_similarity_maps, reference.cross_similarity_maps])
@pytest.mark.parametrize(
    "qk,theta,kwargs,error,match",
    [
        ([1.0], GOOD_THETA, {}, TypeError, "qk must be a torch.Tensor"),
        (torch.randn(2, 3, 5), GOOD_THETA, {}, ValueError, "4 dimensions"),
        (torch.randn(3, 2, 3, 5), GOOD_THETA, {}, ValueError, "4 branches"),
        (torch.randn(4, 0, 3, 5), GOOD_THETA, {}, ValueError, "empty dimension B"),
        (torch.randn(4, 2, 0, 5), GOOD_THETA, {}, ValueError, "empty dimension N"),
        (torch.randn(4, 2, 3, 0), GOOD_THETA, {}, ValueError, "empty dimension C"),
        (torch.ones(4, 2, 3, 5, dtype=torch.int64), GOOD_THETA, {}, TypeError, "floating dtype"),
        (GOOD_QK, GOOD_THETA.double(), {}, TypeError, "theta has dtype"),
        (GOOD_QK, 0.0, {}, TypeError, "theta must be a torch.Tensor"),
        (GOOD_QK, torch.zeros(2), {}, ValueError, "theta must hold exactly one element"),
        (GOOD_QK, torch.zeros((), device="meta"), {}, ValueError, "theta is on meta"),
        (GOOD_QK, GOOD_THETA, {"mode": "sdx"}, ValueError, "mode must be one of"),
        (GOOD_QK, GOOD_THETA, {"scope": "global"}, ValueError, "scope must be one of"),
        (GOOD_QK, GOOD_THETA, {"gamma": float("nan")}, ValueError, "gamma must be finite"),
        (GOOD_QK, GOOD_THETA, {"gamma": float("inf")}, ValueError, "gamma must be finite"),
        (GOOD_QK, GOOD_THETA, {"gamma": "1.0"}, TypeError, "gamma must be a float"),
    ],
)
def test_bad_input_raises_clear_error(fn, qk, theta, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(qk, theta, **kwargs)


@pytest.mark.parametrize("fn", [qcs_ext.pair_similarity_maps, reference.pair_similarity_maps])
def test_pair_bad_input(fn):
    with pytest.raises(ValueError, match="2 branches"):
        fn(torch.randn(4, 2, 3, 5))
    with pytest.raises(ValueError, match="scope must be one of"):
        fn(torch.randn(2, 2, 3, 5), scope="all")


def test_native_op_checks_direct_calls():
    """The ops check their own arguments too, for callers that skip the Python wrapper."""
    ops = torch.ops.qcs_ext
    with pytest.raises(ValueError, match="qk must have shape"):
        ops.cross_similarity_forward(torch.randn(3, 2, 3, 5), GOOD_THETA, 1.0, "sd", "batch")
    with pytest.raises(ValueError, match="mode must be"):
        ops.cross_similarity_forward(GOOD_QK, GOOD_THETA, 1.0, "x", "batch")
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.cross_similarity_forward(GOOD_QK.half(), GOOD_THETA.half(), 1.0, "sd", "batch")
    maps, dist, ext = ops.cross_similarity_forward(GOOD_QK, GOOD_THETA, 1.0, "sd", "batch")
    with pytest.raises(ValueError, match="distances must have shape"):
        ops.cross_similarity_backward(maps, maps, GOOD_QK, dist[:2], ext, GOOD_THETA, 1.0, "sd", "batch")


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 196, 48), (1, 784, 24)])
@pytest.mark.parametrize("scope", SCOPES)
def test_large_token_grids_match_reference(shape, scope):
    """N = 196 and 784 (14x14 and 28x28 grids): several row blocks per matrix."""
    qk, theta = _inputs(shape, torch.float64)
    upstream = torch.randn(4, *shape[:2], dtype=torch.float64)
    fused = _grads(qcs_ext.cross_similarity_maps, qk, theta, upstream, scope=scope)
    ref = _grads(reference.cross_similarity_maps, qk, theta, upstream, scope=scope)
    for got, want in zip(fused, ref):
        assert (got - want).abs().max() <= 1e-10 * max(want.abs().max().item(), 1e-12)


@pytest.mark.parametrize("mode,unused", [("s", (2, 3)), ("d", (0, 1)), ("sd", ())])
def test_forward_distances_are_cdist_and_unused_slots_zero(mode, unused):
    """The native forward's saved distances: torch.cdist of each pair the mode uses, and
    zero (not uninitialised memory) for the matrices it does not."""
    qk, theta = _inputs((3, 6, 5), torch.float64)
    qk = qk.detach()
    # Leave NaN in freed memory of the distances' size, so an uncleared slot shows.
    garbage = torch.full((4, 3, 6, 6), float("nan"), dtype=torch.float64)
    del garbage
    _, dist, ext = torch.ops.qcs_ext.cross_similarity_forward(qk, theta.detach(), 1.0, mode, "sample")
    rows, cols = (1, 3, 2, 3), (0, 2, 0, 1)  # D_pa, D_n2n, D_na, D_n2p
    for m in range(4):
        if m in unused:
            assert (dist[m] == 0).all() and (ext[m] == 0).all()
        else:
            torch.testing.assert_close(dist[m], torch.cdist(qk[rows[m]], qk[cols[m]]))
