"""The CUDA kernels, run on the CPU under the emulation layer, against the reference.

``qcs_ext.emulated`` executes the sources of ``csrc/cuda`` (kernels, launch
configuration and host code) with each block's threads as host threads, so these tests
check the CUDA kernels' arithmetic, indexing and synchronisation without a GPU. The
extension exists only when built with ``QCS_BUILD_EMULATION=1``; CI builds it, and there a
missing extension is a failure, not a skip.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from op_helpers import maps_and_grads

from qcs_ext import reference as ref

try:
    import qcs_ext.emulated as em
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("CI", "").lower() == "true":
        raise  # CI builds the emulation: its absence is a build failure
    pytest.skip(f"qcs_ext._emulated not built ({exc})", allow_module_level=True)

pytestmark = pytest.mark.emulated

MODES = ("sd", "s", "d")
SCOPES = ("batch", "sample")
HALF = (torch.float16, torch.bfloat16)


def _features(branches, batch, tokens, channels, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(branches, batch, tokens, channels, generator=gen, dtype=torch.float64).to(
        dtype
    )


def _theta(dtype, value=0.3):
    return torch.tensor(value, dtype=dtype)


def _check_close_to_reference(qk, theta, mode, scope, pair=False, grads=True):
    """Emulated kernels vs the reference, with tolerances per dtype.

    float64: ~1e-10 relative. float32 (flash-attention style): the error against the
    float64 reference is at most twice the float32 reference's own error, plus a small
    atol. Half types: computed in float32 inside, so compared with the float64
    reference on the same (rounded) inputs with a tolerance of a few half ulps.
    """
    dtype = qk.dtype
    kw = {"scope": scope} if pair else {"mode": mode, "scope": scope}
    emu_fn = em.pair_similarity_maps if pair else em.cross_similarity_maps
    ref_fn = ref.pair_similarity_maps if pair else ref.cross_similarity_maps
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(qk.shape[:3], generator=gen, dtype=torch.float64)
    th = None if pair else theta
    th64 = None if pair else theta.double()

    out, g = maps_and_grads(emu_fn, qk, th, grad_out, **kw)
    assert out.dtype == dtype and out.shape == qk.shape[:3]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.double().sum(-1),
        torch.ones(qk.shape[:2], dtype=torch.float64),
        atol=5e-3 if dtype in HALF else 1e-5,
        rtol=0,
    )
    out64, g64 = maps_and_grads(ref_fn, qk.double(), th64, grad_out, **kw)
    if not grads:
        g, g64 = [], []

    def compare(name, got, exp, ref_low=None):
        got = got.double()
        scale = exp.abs().max().item() + 1e-30
        if dtype == torch.float64:
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10 * scale, msg=name)
        elif dtype == torch.float32:
            err = (got - exp).abs().max().item()
            ref_err = (ref_low.double() - exp).abs().max().item()
            assert err <= 2 * ref_err + 1e-5 * max(scale, 1.0), f"{name}: {err} vs ref32 {ref_err}"
        else:
            err = (got - exp).abs().max().item()
            assert err <= 2e-2 * max(scale, 1e-2), f"{name}: {err} (scale {scale})"

    if dtype == torch.float32:
        out32, g32 = maps_and_grads(ref_fn, qk, th, grad_out, **kw)
    else:
        out32, g32 = None, [None] * len(g)
    compare("maps", out, out64, out32)
    for i, (a, b, c) in enumerate(zip(g, g64, g32)):
        compare(f"grad[{i}]", a, b, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
@pytest.mark.parametrize("batch,tokens", [(2, 1), (2, 7), (1, 7), (2, 49)])
def test_cross_matches_reference(dtype, mode, scope, batch, tokens):
    qk = _features(4, batch, tokens, 6, dtype, seed=tokens + 10 * batch)
    _check_close_to_reference(
        qk, _theta(dtype), mode, scope, grads=tokens != 49 or dtype != torch.float16
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("batch,tokens", [(1, 1), (3, 7), (2, 49)])
def test_pair_matches_reference(dtype, scope, batch, tokens):
    qk = _features(2, batch, tokens, 5, dtype, seed=3)
    _check_close_to_reference(qk, None, None, scope, pair=True)


@pytest.mark.parametrize("mode,scope", [("sd", "batch"), ("s", "sample"), ("d", "batch")])
def test_streaming_path_small(monkeypatch, mode, scope):
    """The tiled/streaming epilogue (normally N > ~100) forced at small N."""
    monkeypatch.setenv("QCS_CSA_FORCE_STREAMING", "1")
    _check_close_to_reference(
        _features(4, 2, 7, 4, torch.float64, seed=5), _theta(torch.float64), mode, scope
    )
    _check_close_to_reference(
        _features(4, 1, 33, 3, torch.float32, seed=6), _theta(torch.float32), mode, scope
    )


@pytest.mark.parametrize(
    "dtype,mode,scope",
    [
        (torch.float64, "sd", "sample"),
        (torch.float32, "sd", "batch"),
        (torch.bfloat16, "s", "sample"),
    ],
)
def test_tiled_n196(dtype, mode, scope):
    _check_close_to_reference(
        _features(4, 1, 196, 8, dtype, seed=7), _theta(dtype, -0.4), mode, scope
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype,scope", [(torch.float32, "batch")])
def test_tiled_n784(dtype, scope):
    _check_close_to_reference(_features(4, 1, 784, 4, dtype, seed=8), _theta(dtype), "sd", scope)


@pytest.mark.slow
def test_n196_batch_float64_all_modes():
    for mode in MODES:
        _check_close_to_reference(
            _features(4, 1, 196, 4, torch.float64, seed=9), _theta(torch.float64), mode, "batch"
        )


def _duplicated_tokens(batch=2, tokens=5, channels=3, dtype=torch.float64):
    """Zero distances: p repeats a's tokens, n2 repeats n's, and one token is repeated within a."""
    qk = _features(4, batch, tokens, channels, dtype, seed=11)
    qk[0, :, 1] = qk[0, :, 0]
    qk[1] = qk[0]
    qk[3] = qk[2]
    return qk


@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
def test_zero_distances(mode, scope):
    qk = _duplicated_tokens()
    _check_close_to_reference(qk, _theta(torch.float64), mode, scope)
    _check_close_to_reference(qk.float(), _theta(torch.float32), mode, scope)
    _, dist, _ = em.ops.cross_similarity_forward(qk, _theta(torch.float64), 1.0, mode, scope)
    if mode != "d":  # D_pa holds exact zeros where p repeats a
        assert (dist[0].diagonal(dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
def test_constant_inputs(mode, scope):
    """All tokens equal: every distance 0, every shifted matrix 0 (the 1e-12 clamp path)."""
    qk = torch.full((4, 2, 5, 3), 0.7, dtype=torch.float64)
    _check_close_to_reference(qk, _theta(torch.float64), mode, scope)
    out = em.cross_similarity_maps(qk, _theta(torch.float64), mode=mode, scope=scope)
    torch.testing.assert_close(out, torch.full_like(out, 1 / 5))


def _gradcheck_inputs(branches, batch, tokens, channels, seed):
    qk = _features(branches, batch, tokens, channels, torch.float64, seed=seed).requires_grad_(True)
    return qk


# Every emulated op call costs ~0.2 s (hundreds of host threads per launch), so gradcheck
# runs in fast mode (random projections of the Jacobian) except for one tiny full check.
@pytest.mark.parametrize("mode,scope", list(itertools.product(MODES, SCOPES)))
@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, 4)])
def test_gradcheck_cross(mode, scope, batch, tokens):
    qk = _gradcheck_inputs(4, batch, tokens, 3, seed=batch * 7 + tokens)
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, t: em.cross_similarity_maps(q, t, gamma=0.8, mode=mode, scope=scope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, theta), eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_cross_full_jacobian():
    qk = _gradcheck_inputs(4, 1, 2, 2, seed=13)
    theta = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, t: em.cross_similarity_maps(q, t, mode="sd", scope="batch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, theta), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("scope", SCOPES)
def test_gradcheck_pair(scope):
    qk = _gradcheck_inputs(2, 2, 4, 3, seed=21)
    fn = lambda q: em.pair_similarity_maps(q, scope=scope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk,), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("scope", SCOPES)
def test_gradcheck_duplicated_tokens(scope):
    """Zero distances: the gradient of a distance that is exactly 0 is 0 (as in cdist);
    only the entries gradcheck can perturb without breaking the tie are checked, so the
    perturbed copy keeps its duplicates (p = a, n2 = n) through a view."""
    base = _features(2, 2, 4, 3, torch.float64, seed=31).requires_grad_(True)
    theta = torch.tensor(-0.1, dtype=torch.float64, requires_grad=True)

    def fn(x, t):
        qk = torch.stack([x[0], x[0], x[1], x[1]])
        return em.cross_similarity_maps(qk, t, scope=scope)

    def fn_ref(x, t):
        qk = torch.stack([x[0], x[0], x[1], x[1]])
        return ref.cross_similarity_maps(qk, t, scope=scope)

    g = torch.randn(4, 2, 4, dtype=torch.float64)
    got = torch.autograd.grad(fn(base, theta), (base, theta), g)
    exp = torch.autograd.grad(fn_ref(base, theta), (base, theta), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_constant_inputs_gradient_is_finite_and_matches():
    qk = torch.full((4, 1, 3, 2), -1.5, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    out = em.cross_similarity_maps(qk, theta)
    g = torch.autograd.grad(out.square().sum(), (qk, theta))
    assert all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize("scope", SCOPES)
def test_batch_scope_ties_across_batch(scope):
    """Batch elements sharing the extreme: the routed gradient is spread over all ties."""
    one = _features(4, 1, 4, 3, torch.float64, seed=41)
    qk = one.repeat(1, 3, 1, 1)  # three identical samples: the batch extreme is tied 3 times
    _check_close_to_reference(qk, _theta(torch.float64), "sd", scope)


def test_rows_sum_to_one_large_scores():
    qk = 30 * _features(4, 2, 9, 4, torch.float32, seed=51)
    out = em.cross_similarity_maps(qk, _theta(torch.float32, 2.0), gamma=3.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 2), atol=1e-5, rtol=0)


def test_deterministic_bitwise():
    qk = _features(4, 2, 7, 5, torch.float32, seed=61).requires_grad_(True)
    theta = _theta(torch.float32).requires_grad_(True)
    g = torch.randn(4, 2, 7)
    runs = []
    for _ in range(2):
        out = em.cross_similarity_maps(qk, theta)
        runs.append((out, *torch.autograd.grad(out, (qk, theta), g)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_saved_tensors_layout():
    qk = _features(4, 3, 5, 2, torch.float16, seed=71)
    maps, dist, ext = em.ops.cross_similarity_forward(qk, _theta(torch.float16), 1.0, "sd", "batch")
    assert (
        maps.dtype == torch.float16 and dist.dtype == torch.float32 and ext.dtype == torch.float32
    )
    assert dist.shape == (4, 3, 5, 5) and ext.shape == (4, 3)
    assert (ext == ext[:, :1]).all()  # batch scope: the same extreme in every column
    q = qk.float()
    rows, cols = (1, 3, 2, 3), (0, 2, 0, 1)
    for m in range(4):
        torch.testing.assert_close(
            dist[m], torch.cdist(q[rows[m]], q[cols[m]]), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(ext[:2, 0], dist[:2].amax(dim=(1, 2, 3)))
    torch.testing.assert_close(ext[2:, 0], dist[2:].amin(dim=(1, 2, 3)))
    _, dist_s, ext_s = em.ops.cross_similarity_forward(
        qk, _theta(torch.float16), 1.0, "s", "sample"
    )
    torch.testing.assert_close(ext_s[0], dist_s[0].amax(dim=(1, 2)))
    assert (dist_s[2:] == 0).all() and (ext_s[2:] == 0).all()  # unused by mode "s"


def _opcheck_samples():
    qk = _features(4, 2, 5, 3, torch.float64, seed=81)
    theta = _theta(torch.float64)
    qk2 = _features(2, 2, 5, 3, torch.float32, seed=82)
    return qk, theta, qk2


@pytest.mark.parametrize("mode,scope", [("sd", "batch"), ("s", "sample"), ("d", "sample")])
def test_opcheck_cross(mode, scope):
    qk, theta, _ = _opcheck_samples()
    qk = qk.requires_grad_(True)
    theta = theta.requires_grad_(True)
    torch.library.opcheck(em.ops.cross_similarity_forward, (qk, theta, 1.0, mode, scope))
    maps, dist, ext = em.ops.cross_similarity_forward(qk.detach(), theta.detach(), 1.0, mode, scope)
    g = torch.randn_like(maps)
    torch.library.opcheck(
        em.ops.cross_similarity_backward,
        (g, maps, qk.detach(), dist, ext, theta.detach(), 1.0, mode, scope),
    )


def test_opcheck_pair():
    _, _, qk2 = _opcheck_samples()
    torch.library.opcheck(em.ops.pair_similarity_forward, (qk2.requires_grad_(True), "batch"))
    maps, dist, ext = em.ops.pair_similarity_forward(qk2.detach(), "sample")
    torch.library.opcheck(
        em.ops.pair_similarity_backward,
        (torch.randn_like(maps), maps, qk2.detach(), dist, ext, "sample"),
    )


def test_bad_input_errors():
    qk = _features(4, 2, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="4 branches|first dimension"):
        em.cross_similarity_maps(qk[:3], _theta(torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        em.cross_similarity_maps(qk, _theta(torch.float64))
    with pytest.raises(ValueError, match="mode"):
        em.cross_similarity_maps(qk, _theta(torch.float32), mode="x")
    # the ops themselves check too (they are public through torch.ops)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        em.ops.cross_similarity_forward(qk[:3], _theta(torch.float32), 1.0, "sd", "batch")
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        em.ops.cross_similarity_forward(qk, _theta(torch.float64), 1.0, "sd", "batch")
    with pytest.raises((ValueError, RuntimeError), match="scope"):
        em.ops.pair_similarity_forward(qk[:2], "everything")
    with pytest.raises((ValueError, RuntimeError), match="empty"):
        em.ops.pair_similarity_forward(qk[:2, :, :0], "batch")


def test_non_contiguous_input():
    qk = _features(4, 2, 6, 5, torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    assert not qk.is_contiguous()
    _check_close_to_reference(qk, _theta(torch.float64), "sd", "batch")


# ---- the review's GPU risks, as far as the emulation sees them --------------------------


@pytest.fixture
def tf32_switches_on():
    """The global TF32 switches many training scripts turn on (restored afterwards)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cuda.matmul.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("path", ["gemms", "tensor cores"])
def test_tf32_switches_do_not_reach_the_gemms(tf32_switches_on, monkeypatch, path):
    """Risk 1: the emulation rounds GEMM operands to TF32 where cuBLAS would (global
    switches on, no NoTF32Guard); the op pins full float32 on the GEMM path and uses
    3xTF32 on the tensor-core path, so distances, maps and gradients keep float32
    accuracy with the switches on, on both paths."""
    assert torch.backends.cuda.matmul.allow_tf32
    if path == "gemms":
        monkeypatch.setenv("QCS_CSA_FORCE_STREAMING", "1")
    qk = _features(4, 2, 7, 64, torch.float32, seed=91)
    em.ops.launch_log()
    _, dist, _ = em.ops.cross_similarity_forward(qk, _theta(torch.float32), 1.0, "sd", "sample")
    assert any("cuBLAS" in k for k in em.ops.launch_log()) == (path == "gemms")
    q = qk.double()
    rows, cols = (1, 3, 2, 3), (0, 2, 0, 1)
    for m in range(4):
        exact = torch.cdist(q[rows[m]], q[cols[m]])
        err = (dist[m].double() - exact).abs().max().item()
        assert err <= 2e-5 * exact.max().item(), f"matrix {m}: {err} (TF32 gives ~1e-3)"
    _check_close_to_reference(qk, _theta(torch.float32), "sd", "batch")


def _kernel_names(log):
    """Kernel names of a launch log entry ("kern::name<T, A>" -> "name")."""
    return [k.split("::")[-1].split("<")[0] if "cuBLAS" not in k else "cuBLAS" for k in log]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scope", SCOPES)
def test_forward_launches_at_small_n(dtype, scope):
    """At the paper's N = 49 the forward is one tile kernel (Gram tiles, distances, sample
    extremes: on tensor cores, float64 on CUDA cores), the batch extremes (scope "batch"
    only) and the fused epilogue: at most 3 launches and no cuBLAS call (the GEMM path
    takes 4 GEMMs and 5-6 kernels)."""
    qk = _features(4, 2, 49, 16, dtype, seed=97)
    em.ops.launch_log()
    em.ops.cross_similarity_forward(qk, _theta(dtype), 1.0, "sd", scope)
    names = _kernel_names(em.ops.launch_log())
    tile = "cuda_core" if dtype == torch.float64 else "tensor_core"
    expected = [f"{tile}_distance_kernel"]
    expected += ["batch_extrema_kernel"] if scope == "batch" else []
    assert names == expected + ["fused_epilogue_kernel"]


def test_launches_at_n196():
    """Above N = 64 the Gram tiles still run on tensor cores (64 x 64 tiles spread over the
    grid, the tiles' extremes reduced per sample): 5 launches forward; the backward writes
    W and takes its products on tensor cores in 64 x 32 tiles: 5 launches. No cuBLAS."""
    qk = _features(4, 1, 196, 8, torch.float32, seed=100)
    em.ops.launch_log()
    maps, dist, ext = em.ops.cross_similarity_forward(
        qk, _theta(torch.float32), 1.0, "sd", "batch"
    )
    assert _kernel_names(em.ops.launch_log()) == [
        "tensor_core_distance_kernel", "sample_extrema_kernel", "batch_extrema_kernel",
        "stream_aggregate_kernel", "fuse_softmax_kernel",
    ]
    em.ops.cross_similarity_backward(
        torch.randn_like(maps), maps, qk, dist, ext, _theta(torch.float32), 1.0, "sd", "batch"
    )
    assert _kernel_names(em.ops.launch_log()) == [
        "softmax_backward_kernel", "backward_stats_kernel", "backward_reduce_kernel",
        "backward_weights_kernel", "tensor_core_gradient_tiles_kernel",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_launches_at_small_n(dtype):
    """At N = 49 the backward is 4 launches (softmax backward, per-matrix statistics, the
    routed extremes and theta's gradient, then W on chip with the gradient products on
    tensor cores) and no cuBLAS call (the GEMM path: 8 GEMMs and ~16 ATen ops more)."""
    qk = _features(4, 2, 49, 16, dtype, seed=99)
    maps, dist, ext = em.ops.cross_similarity_forward(qk, _theta(dtype), 1.0, "sd", "batch")
    em.ops.launch_log()
    em.ops.cross_similarity_backward(
        torch.randn_like(maps), maps, qk, dist, ext, _theta(dtype), 1.0, "sd", "batch"
    )
    assert _kernel_names(em.ops.launch_log()) == [
        "softmax_backward_kernel", "backward_stats_kernel", "backward_reduce_kernel",
        "tensor_core_gradient_kernel",
    ]


def test_float64_distance_tiles_at_n196():
    """float64 above N = 64: the distance tiles on CUDA cores spread over the grid (a 2 x 2
    tile edge at 196 = 3 x 64 + 4), the tiles' extremes reduced per sample, no cuBLAS in
    the forward; distances equal float64 torch.cdist."""
    qk = _features(4, 2, 196, 40, torch.float64, seed=101)
    em.ops.launch_log()
    _, dist, _ = em.ops.cross_similarity_forward(qk, _theta(torch.float64), 1.0, "sd", "sample")
    assert _kernel_names(em.ops.launch_log()) == [
        "cuda_core_distance_kernel", "sample_extrema_kernel", "stream_aggregate_kernel",
        "fuse_softmax_kernel",
    ]
    rows, cols = (1, 3, 2, 3), (0, 2, 0, 1)
    for m in range(4):
        torch.testing.assert_close(dist[m], torch.cdist(qk[rows[m]], qk[cols[m]]),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [49, 70])
def test_float64_backward_launches(tokens):
    """float64 backward: W written by backward_weights_kernel, the gradient products in
    tiles on CUDA cores: 5 launches and no cuBLAS (the GEMM path: 8 GEMMs and ~16 ATen
    ops); the gradient matches the reference (70 = one full and one partial token tile,
    40 channels = two full and one partial 16-channel tile)."""
    qk = _features(4, 2, tokens, 40, torch.float64, seed=102)
    maps, dist, ext = em.ops.cross_similarity_forward(qk, _theta(torch.float64), 1.0, "sd", "batch")
    em.ops.launch_log()
    em.ops.cross_similarity_backward(
        torch.randn_like(maps), maps, qk, dist, ext, _theta(torch.float64), 1.0, "sd", "batch"
    )
    assert _kernel_names(em.ops.launch_log()) == [
        "softmax_backward_kernel", "backward_stats_kernel", "backward_reduce_kernel",
        "backward_weights_kernel", "cuda_core_gradient_tiles_kernel",
    ]
    _check_close_to_reference(qk, _theta(torch.float64), "sd", "batch")


def test_tensor_cores_keep_float32_accuracy():
    """3xTF32: float32 distances at N = 49 and C = 256 within 1e-6 relative of float64
    (one TF32 mma alone is ~1e-3 off: see test_cuda_build's negative control), the cases
    that cancel (a large common offset) recomputed directly."""
    gen = torch.Generator().manual_seed(98)
    q = torch.randn(4, 1, 49, 256, generator=gen, dtype=torch.float64)
    q[2:] += 30.0  # n and n2 far from a and p: D_na, D_n2p large, D_pa, D_n2n not
    _, dist, _ = em.ops.cross_similarity_forward(
        q.float(), _theta(torch.float32), 1.0, "sd", "batch"
    )
    qf = q.float().double()  # the float32 inputs, exactly
    rows, cols = (1, 3, 2, 3), (0, 2, 0, 1)
    for m in range(4):
        exact = torch.cdist(qf[rows[m]], qf[cols[m]])
        rel = ((dist[m].double() - exact).abs() / exact).max().item()
        assert rel <= 1e-6, f"matrix {m}: relative error {rel:.2e}"


def test_subnormal_squared_distances_stay_nonzero():
    """Risk 2: squared distances below float32's smallest normal (1.2e-38) are kept, not
    flushed to zero (no --use_fast_math): a nearly-duplicated token is no duplicate."""
    qk = 1e-20 * _features(4, 2, 5, 3, torch.float64, seed=92)  # squared norms ~1e-40
    qk = qk.float()
    _, dist, _ = em.ops.cross_similarity_forward(qk, _theta(torch.float32), 1.0, "sd", "sample")
    q = qk.double()
    exact = torch.cdist(q[1], q[0])  # D_pa
    got = dist[0].double()
    assert (exact.square() < 1.2e-38).all() and (got > 0).all()
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=0)


@pytest.fixture
def no_kernel_image(monkeypatch):
    """The emulated runtime answers "no kernel image for this device" (a GPU newer than
    every image of the build); the binding's per-device cache starts empty."""
    monkeypatch.setenv("QCS_EMULATED_NO_KERNEL_IMAGE", "1")
    monkeypatch.setattr(em.IMAGES, "_image_cache", {})
    yield
    em.IMAGES._image_cache = {}


def test_no_kernel_image_falls_back_to_the_reference(no_kernel_image):
    """Risk 3: without a kernel image for the device, has_fused_kernel says False, the
    wrappers warn once and compute with the reference, the raw op explains itself."""
    qk = _features(4, 2, 5, 3, torch.float64, seed=94)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert not em.has_kernel("cpu")
    out = em.cross_similarity_maps(qk, _theta(torch.float64), mode="d", scope="sample")
    assert torch.equal(
        out, ref.cross_similarity_maps(qk, _theta(torch.float64), mode="d", scope="sample")
    )
    assert torch.equal(em.pair_similarity_maps(qk[:2]), ref.pair_similarity_maps(qk[:2]))
    with pytest.raises(RuntimeError, match="no CUDA kernel image"):
        em.ops.cross_similarity_forward(qk, _theta(torch.float64), 1.0, "sd", "batch")


def test_kernel_image_present_by_default():
    em.IMAGES._image_cache = {}
    assert em.has_kernel("cpu") and em.ops.kernel_image_fits(0)


@pytest.mark.parametrize("batch", [16384, 20000, 70000])
def test_launch_geometry_of_large_batches(monkeypatch, batch):
    """Risk 4: every launch of forward and backward at B > 16383 (4B > gridDim.y's 65535)
    passes the emulator's launch validator, up to B = 70000. Dry run: validated, not
    executed (test_batch_of_20000_executed runs B = 20000)."""
    monkeypatch.setenv("QCS_EMULATION_DRY_RUN", "1")
    qk = torch.zeros(4, batch, 2, 2)
    for scope in SCOPES:
        maps, dist, ext = em.ops.cross_similarity_forward(
            qk, _theta(torch.float32), 1.0, "sd", scope
        )
        em.ops.cross_similarity_backward(
            maps, maps, qk, dist, ext, _theta(torch.float32), 1.0, "sd", scope
        )
        maps, dist, ext = em.ops.pair_similarity_forward(qk[:2], scope)
        em.ops.pair_similarity_backward(maps, maps, qk[:2], dist, ext, scope)


@pytest.mark.slow
@pytest.mark.parametrize("pair,scope", [(False, "batch"), (False, "sample"), (True, "batch")])
def test_batch_of_20000_executed(pair, scope):
    """Risk 4, executed: B = 20000 at small N (4B = 80,000 blocks per kernel, beyond
    gridDim.y's 65535), every block run by the emulation; maps and gradients against the
    reference, so blocks past sample 16383 index their samples right."""
    qk = _features(2 if pair else 4, 20000, 3, 8, torch.float32, seed=97)
    _check_close_to_reference(qk, _theta(torch.float32), "sd", scope, pair=pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scope", SCOPES)
def test_large_common_offset_recomputes_every_entry(dtype, scope):
    """Risk 5: a large common offset makes the Gram form cancel for every entry, so every
    distance is recomputed (a warp per entry, lanes over the channels, C > 32 so each lane
    sums several channels) and must still match the reference."""
    gen = torch.Generator().manual_seed(95)
    qk = (1000.0 + 0.05 * torch.randn(4, 2, 9, 70, generator=gen, dtype=torch.float64)).to(dtype)
    _check_close_to_reference(qk, _theta(dtype), "sd", scope)


@pytest.mark.parametrize("scope", SCOPES)
def test_extrema_and_routing_over_many_samples(scope):
    """Risk 5: the per-sample extremes (a warp per sample, several blocks) and the routed
    gradient (parallel over the batch) at a batch spread over many warps and blocks."""
    qk = _features(4, 37, 2, 3, torch.float64, seed=96)
    qk[:, 5] = qk[:, 4]  # a tie across samples
    _check_close_to_reference(qk, _theta(torch.float64), "sd", scope)
