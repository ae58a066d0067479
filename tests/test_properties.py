"""Property-based tests of the CSA ops (hypothesis): drawn inputs against the float64 reference.

Every example draws a shape (``B, N, C`` from 1), a dtype, ``mode``, ``scope``, ``gamma``,
``theta``, a value pattern (Gaussian at any scale, a large common offset, duplicated tokens,
small integers with exact ties, constant input) and a memory layout (contiguous,
channel-major, branch-last "channels-last", strided slices of a larger NaN-filled buffer,
stride-0 expansions), runs the CPU op or the emulated CUDA op on it, and checks:

- the maps and the gradients (for a random upstream gradient) against the reference run
  in float64 on the same (rounded) input values;
- every map row sums to 1;
- nothing is NaN or Inf.

Input domain. The maps do not change when the input is scaled, but the kernels work on
squared norms and squared distances, and the aggregation on sums of squared distances, so
a dtype holds only inputs with ``max|x| * sqrt(C * N) <= DOMAIN[dtype]`` (float32/bfloat16
1e18, float64 1e150). Beyond it the squared norms overflow and the maps are NaN, as the
float32 reference's are for spread-out tokens (see
``test_out_of_domain_float32_is_not_finite_like_the_reference``). Within it everything must
be finite; tiny inputs are drawn down to where the squares leave the normal range. One
exception: at the 1e-12 clamp (constant rows, ties) the exact gradient is ~1e12 and does
not fit float16, so it is not compared there.

Profiles (registered in ``conftest.py``): ``ci`` (default, derandomized: CI sees the same
examples every run, ~2 minutes) and ``long`` (``QCS_HYPOTHESIS_PROFILE=long``, fresh random
examples, >= 10,000 in all). See docs/testing.md, "Property-based tests".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from op_helpers import assert_matches_reference, maps_and_grads

import qcs_ext
from qcs_ext import reference as ref

try:
    import qcs_ext.emulated as em
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("CI", "").lower() == "true":
        raise  # CI builds the emulation: its absence is a build failure
    em = None
    EM_MISSING = f"qcs_ext._emulated not built ({exc})"

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Largest max|x| * sqrt(C * N) per dtype: squared distances and a row's sum of them must
# stay finite (float16 inputs are computed in float32, its own range is the limit there).
DOMAIN = {torch.float64: 1e150, torch.float32: 1e18, torch.bfloat16: 1e18, torch.float16: 6e4}
# Decimal exponent range of the drawn scale. float32's low end keeps squares normal
# (1e-19 ** 2 is subnormal); float16 stays clear of its subnormals and of 65504.
SCALE_EXP = {torch.float64: (-100, 100), torch.float32: (-17, 16), torch.bfloat16: (-17, 16),
             torch.float16: (-2, 3)}
LAYOUTS = ("contiguous", "channel_major", "branch_last", "sliced", "expand_batch",
           "expand_token", "expand_branch")
VALUES = ("gaussian", "offset", "duplicated", "integers", "constant")

# The emulated CUDA op runs each block's threads as host threads (~0.3-1 s per forward and
# backward), so it gets a fraction of the examples and smaller shapes.
_BASE = settings.default.max_examples
CPU_EXAMPLES = _BASE
EMU_EXAMPLES = max(10, _BASE // 6)
BAD_EXAMPLES = max(20, _BASE // 2)


@dataclass
class Case:
    """One drawn example: the op's inputs before the layout is applied."""

    qk: torch.Tensor  # contiguous, dtype of the case
    theta: torch.Tensor
    gamma: float
    mode: str
    scope: str
    layout: str
    values: str
    grad_seed: int


def perturbed_reference(pair: bool, delta: float, phase: float):
    """The reference with every distance perturbed by a relative error of at most ``delta``,
    a smooth function of the distance itself (equal distances stay equal, zeros stay zero):
    the reference's sensitivity to the distance errors the kernels are allowed. Same call
    signature as the reference function it stands for."""
    def distance(rows, cols):
        dist = ref.distance(rows, cols)
        top = dist.detach().amax().clamp_min(1e-300)
        return dist * (1 + delta * torch.sin(997.0 * dist.detach() / top + phase))

    if pair:
        return lambda qk2, *, scope: ref.pair_maps_from(distance, qk2, scope)
    return lambda qk, theta, *, gamma, mode, scope: ref.cross_maps_from(
        distance, qk, theta, gamma, mode, scope)


def _distance_error_bound(dtype: torch.dtype) -> float:
    """Relative error of a kernel's distance: the Gram identity is used while
    ``d^2 >= threshold * (|x|^2 + |y|^2)`` (``RefineThreshold`` in csrc/csa_common.h: 1e-2 in
    float32, 1e-5 in float64), so ``d^2`` keeps ~``eps / threshold`` of relative accuracy."""
    if dtype == torch.float64:
        return 4 * _eps(torch.float64) / 1e-5
    return 4 * _eps(torch.float32) / 1e-2


def _values(kind: str, shape, dtype, scale_exp: float, seed: int) -> torch.Tensor:
    """Draw a ``shape`` tensor of one value pattern, in float64, then round it to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** scale_exp
    if kind == "gaussian":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    elif kind == "offset":
        # A common offset 1 to 1e4 times the spread: distances cancel in the Gram identity.
        ratio = 10.0 ** (4 * torch.rand((), generator=gen, dtype=torch.float64).item())
        per_channel = torch.randn(shape[-1], generator=gen, dtype=torch.float64).sign()
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) + ratio * per_channel) * scale
    elif kind == "duplicated":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if torch.rand((), generator=gen).item() < 0.5:
            x[1] = x[0]  # p repeats a: zero distances on D_pa's diagonal
        if shape[0] == 4 and torch.rand((), generator=gen).item() < 0.5:
            x[3] = x[2]  # n2 repeats n
        tokens = x.view(-1, shape[-1])  # every token of every branch and sample
        for _ in range(int(torch.randint(1, 2 * shape[2] + 1, (), generator=gen))):
            dst, src = torch.randint(0, tokens.shape[0], (2,), generator=gen).tolist()
            tokens[dst] = tokens[src]
    elif kind == "integers":
        # Small integers times a power of two: every distance exact, many exact ties.
        x = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
        x = x * 2.0 ** round(scale_exp * 3.3)
    elif kind == "constant":
        value = (torch.rand((), generator=gen).item() * 2 - 1) * scale
        x = torch.full(shape, value, dtype=torch.float64)
    else:  # pragma: no cover - the strategy draws from VALUES
        raise ValueError(f"unknown value pattern {kind!r}")
    return x.to(dtype)


def apply_layout(layout: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[P, B, N, C]``) presented with other strides; differentiable, same values
    except for the ``expand_*`` layouts, which repeat one slice with stride 0."""
    p, b, n, c = x.shape
    if layout == "contiguous":
        return x
    if layout == "channel_major":  # C varies slowest within a sample
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "branch_last":  # channels-last-like: the branch index is the fastest
        return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    if layout == "sliced":
        # Every other element of a NaN-filled buffer: any read outside the view shows.
        big = torch.full((p, b, 2 * n, 2 * c + 1), float("nan"), dtype=x.dtype)
        big[:, :, ::2, 1::2] = x  # recorded by autograd: the gradient flows back to x
        return big[:, :, ::2, 1::2]
    if layout == "expand_batch":
        return x[:, :1].expand(p, b, n, c)
    if layout == "expand_token":
        return x[:, :, :1].expand(p, b, n, c)
    if layout == "expand_branch":
        return x[:1].expand(p, b, n, c)
    raise ValueError(f"unknown layout {layout!r}")  # pragma: no cover


@st.composite
def cases(draw, branches: int, max_b: int, max_n: int, max_c: int, dtypes=DTYPES) -> Case:
    """A full op input: shape, dtype, values, layout and the op's options."""
    dtype = draw(st.sampled_from(dtypes))
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    values = draw(st.sampled_from(VALUES))
    lo, hi = SCALE_EXP[dtype]
    # In the domain: max|x| is at most ~5 (Gaussian) or 1e4 (offset) times the scale.
    margin = 4.8 if values == "offset" else 0.8
    hi = min(hi, math.log10(DOMAIN[dtype] / math.sqrt(c * n)) - margin)
    if values == "offset" and dtype == torch.float16:
        lo = hi - 1.0
    scale_exp = draw(st.floats(min(lo, hi), hi, allow_nan=False))
    seed = draw(st.integers(0, 2**31 - 1))
    qk = _values(values, (branches, b, n, c), dtype, scale_exp, seed)
    theta = torch.tensor(draw(st.floats(-3.0, 3.0, allow_nan=False)), dtype=dtype)
    return Case(
        qk=qk,
        theta=theta,
        gamma=draw(st.floats(-4.0, 4.0, allow_nan=False)),
        mode=draw(st.sampled_from(("sd", "s", "d"))),
        scope=draw(st.sampled_from(("batch", "sample"))),
        layout=draw(st.sampled_from(LAYOUTS)),
        values=values,
        grad_seed=seed + 1,
    )


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _conditioning(qk64: torch.Tensor, scope: str) -> tuple[float, float]:
    """Smallest row or column norm of the shifted matrices (S and E) of ``qk64``, and the
    smallest non-zero distance relative to the largest input magnitude."""
    a, p = qk64[0], qk64[1]
    pairs = [(p, a)]
    if qk64.shape[0] == 4:
        pairs += [(qk64[3], qk64[2]), (qk64[2], a), (qk64[3], p)]
    shifted, nonzero = [], []
    for k, (rows, cols) in enumerate(pairs):
        dist = ref.distance(rows, cols)
        nonzero.append(dist[dist > 0])
        shifted.append(ref._similarity(dist, scope) if k < 2 else ref._cross_distance(dist, scope))
    r = min(min(m.norm(dim=1).min().item(), m.norm(dim=2).min().item()) for m in shifted)
    nonzero = torch.cat(nonzero)
    spread = qk64.abs().max().item() / nonzero.min().item() if nonzero.numel() else 1.0
    return r, spread


def _gradient_noise_floor(case: Case, grad_out: torch.Tensor, pair: bool) -> float:
    """Rounding-error bound of the gradient with respect to ``qk`` in the op's dtype.

    The aggregation's gradient holds terms ``|g| / r`` (``r`` a row or column norm of a
    shifted matrix, clamped at 1e-12), and the shift routes the sum of up to ``B N^2`` of
    them to the extreme; the spec's distance backward ``diag(W 1) X - W Y`` (``W = dL/dD /
    D``) then multiplies them by ``|x| / D`` before the two GEMM terms cancel. Where ties or
    constant rows put ``r`` at the clamp, or a common offset makes ``|x| / D`` large, the
    exact gradient is a cancellation of such terms and any implementation is left with
    rounding noise of their size. The floor is that size times a few epsilons.
    """
    _, b, n, _ = case.qk.shape
    k = 1.0 if pair or case.mode != "sd" else abs(case.gamma) + 1.0
    r, spread = _conditioning(apply_layout(case.layout, case.qk.double()), case.scope)
    terms = 2 * grad_out.abs().max().item() * (1 + k) / max(r, 1e-12) * b * n**3 * (1 + spread)
    compute = torch.float64 if case.qk.dtype == torch.float64 else torch.float32
    return 16 * _eps(compute) * terms


def _compare(name: str, got: torch.Tensor, exp: torch.Tensor, low: torch.Tensor | None, dtype,
             floor: float = 0.0) -> None:
    """``got`` (the op, in ``dtype``) against ``exp`` (float64 reference).

    float64: 1e-9 of the largest magnitude. Lower precisions (flash-attention style): the
    error may be at most twice that of the float32 reference on the same input, plus a few
    units in the last place of ``dtype`` (the rounding of the result itself). Both add
    ``floor``: the reference's own sensitivity to the distance errors the kernels are
    allowed, and for ``qk``'s gradient :func:`_gradient_noise_floor`.
    """
    if dtype == torch.float64:
        assert_matches_reference(name, got, exp, rel=1e-9, floor=floor)
    else:
        assert_matches_reference(name, got, exp, low=low, rel=4 * _eps(dtype), floor=floor)


def _op_input_gradient_max(ref_fn, case: Case, grad_out: torch.Tensor, kw: dict) -> float:
    """Largest float64 gradient with respect to the op's own input (after the layout:
    stride-0 views sum it afterwards, possibly cancelling)."""
    qk = apply_layout(case.layout, case.qk.double()).contiguous()
    theta = None if "mode" not in kw else case.theta.double()
    _, grads = maps_and_grads(ref_fn, qk, theta, grad_out, **kw)
    return max(g.abs().max().item() for g in grads)


def check_against_reference(op, case: Case, pair: bool) -> None:
    """Run ``op`` on the case and compare maps, gradients, row sums and finiteness."""
    dtype = case.qk.dtype
    kw = ({"scope": case.scope} if pair
          else {"gamma": case.gamma, "mode": case.mode, "scope": case.scope})
    ref_fn = ref.pair_similarity_maps if pair else ref.cross_similarity_maps
    theta = None if pair else case.theta
    note(f"shape={tuple(case.qk.shape)} dtype={dtype} values={case.values} layout={case.layout} "
         f"theta={None if pair else case.theta.item()} {kw} "
         f"max|x|={case.qk.abs().max().item():.3e}")

    def with_layout(fn):
        if pair:
            return lambda q, **k: fn(apply_layout(case.layout, q), **k)
        return lambda q, t, **k: fn(apply_layout(case.layout, q), t, **k)

    gen = torch.Generator().manual_seed(case.grad_seed)
    grad_out = torch.randn(case.qk.shape[:3], generator=gen, dtype=torch.float64)
    if dtype in HALF:  # the upstream gradient the op sees is rounded to its dtype
        grad_out = grad_out.to(dtype).double()

    maps, grads = maps_and_grads(with_layout(op), case.qk, theta, grad_out, **kw)
    assert maps.dtype == dtype and maps.shape == case.qk.shape[:3]
    row_tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 4 * _eps(dtype))
    sums = maps.double().sum(-1)
    assert (sums - 1).abs().max().item() <= row_tol, f"rows do not sum to 1: {sums}"

    maps64, grads64 = maps_and_grads(with_layout(ref_fn), case.qk.double(),
                                     None if pair else theta.double(), grad_out, **kw)
    low = None
    if dtype != torch.float64:  # the reference's own error in float32, the tolerance scale
        low = maps_and_grads(with_layout(ref_fn), case.qk.float(), None if pair else theta.float(),
                             grad_out, **kw)
    assert torch.isfinite(maps64).all() and all(torch.isfinite(g).all() for g in grads64)
    # How far the float64 reference moves under distance errors the kernels may make.
    slack = [torch.zeros((), dtype=torch.float64)] * (1 + len(grads64))
    for phase in (0.0, 1.9):
        perturbed = perturbed_reference(pair, _distance_error_bound(dtype), phase)
        m_p, g_p = maps_and_grads(with_layout(perturbed), case.qk.double(),
                                  None if pair else theta.double(), grad_out, **kw)
        slack = [max(a, (b - c).abs().max())
                 for a, b, c in zip(slack, [m_p, *g_p], [maps64, *grads64])]
    _compare("maps", maps, maps64, low and low[0], dtype, 2 * slack[0].item())
    op_grad = _op_input_gradient_max(ref_fn, case, grad_out, kw)
    if op_grad > torch.finfo(dtype).max / 4:
        # The exact gradient the op returns does not fit the dtype (float16 at the 1e-12
        # clamp: ~|g| * 1e12): inf is the right answer there, and the comparison is moot.
        note("gradients not compared: the float64 gradient exceeds the dtype's range")
        return
    # The op's gradient is rounded to its dtype before a stride-0 layout sums its copies
    # (which may cancel): that rounding, times the number of copies, is allowed too.
    copies = {"expand_batch": case.qk.shape[1], "expand_token": case.qk.shape[2],
              "expand_branch": case.qk.shape[0]}.get(case.layout, 1)
    floor = _gradient_noise_floor(case, grad_out, pair) + 2 * _eps(dtype) * op_grad * copies
    # theta's gradient sums 4 B N terms g_score * d (|g_score| <= 2 |g| map, |d| <= N) that
    # may cancel (uniform maps): their rounding in the compute dtype is left, and where the
    # maps are kept in a half dtype for the backward (CUDA), g_score's rounding in it.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    _, b, n, _ = case.qk.shape
    theta_floor = 16 * b * n * grad_out.abs().max().item() * (_eps(dtype) + 2 * n * _eps(compute))
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == dtype
        _compare(("grad qk", "grad theta")[i], g, g64, low and low[1][i], dtype,
                 2 * slack[1 + i].item() + (floor if i == 0 else theta_floor))


# ---- the CPU op --------------------------------------------------------------------------

@settings(max_examples=CPU_EXAMPLES)
@given(case=cases(branches=4, max_b=4, max_n=40, max_c=24))
def test_cpu_cross_matches_reference(case):
    check_against_reference(qcs_ext.cross_similarity_maps, case, pair=False)


@settings(max_examples=max(10, CPU_EXAMPLES // 2))
@given(case=cases(branches=2, max_b=4, max_n=40, max_c=24))
def test_cpu_pair_matches_reference(case):
    check_against_reference(qcs_ext.pair_similarity_maps, case, pair=True)


# ---- the CUDA kernels under the emulation layer ------------------------------------------

needs_emulation = pytest.mark.skipif(em is None, reason=EM_MISSING if em is None else "")


@pytest.mark.emulated
@needs_emulation
@settings(max_examples=EMU_EXAMPLES)
@given(case=cases(branches=4, max_b=3, max_n=12, max_c=8))
def test_emulated_cross_matches_reference(case):
    check_against_reference(em.cross_similarity_maps, case, pair=False)


@pytest.mark.emulated
@needs_emulation
@settings(max_examples=max(10, EMU_EXAMPLES // 2))
@given(case=cases(branches=2, max_b=3, max_n=12, max_c=8))
def test_emulated_pair_matches_reference(case):
    check_against_reference(em.pair_similarity_maps, case, pair=True)


# ---- inputs outside the domain -----------------------------------------------------------

@settings(max_examples=max(5, CPU_EXAMPLES // 20))
@given(exp=st.floats(19.5, 38.0), c=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_out_of_domain_float32_is_not_finite_like_the_reference(exp, c, seed):
    """float32 input whose squared distances overflow: the float32 reference gives NaN, and
    so must the op (a loud failure, not finite numbers that look right)."""
    qk = _values("gaussian", (4, 2, 5, c), torch.float32, exp, seed)
    assume(torch.isfinite(qk).all())
    theta = torch.tensor(0.2)
    want = ref.cross_similarity_maps(qk, theta)
    got = qcs_ext.cross_similarity_maps(qk, theta)
    assert not torch.isfinite(want).all()
    assert not torch.isfinite(got).all()
    if em is not None:
        assert not torch.isfinite(em.cross_similarity_maps(qk, theta)).all()


# ---- bad input ---------------------------------------------------------------------------

DEFECTS = ("rank", "branches", "empty", "theta_dtype", "theta_device", "theta_shape",
           "gamma", "integer_dtype", "mode", "scope", "not_tensor")


@st.composite
def bad_calls(draw):
    """A call of one op with exactly one defect, and the error it must raise."""
    pair = draw(st.booleans())
    branches, name = (2, "qk2") if pair else (4, "qk")
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    shape = [branches, draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 4))]
    theta = torch.zeros((), dtype=dtype)
    kw = {} if pair else {"gamma": draw(st.floats(-2, 2)),
                          "mode": draw(st.sampled_from(("sd", "s", "d")))}
    kw["scope"] = draw(st.sampled_from(("batch", "sample")))
    defects = [d for d in DEFECTS if not (pair and d.startswith(("theta", "gamma", "mode")))]
    defect = draw(st.sampled_from(defects))
    qk = torch.randn(shape, dtype=dtype)  # replaced below where qk itself is the defect
    if defect == "rank":
        rank = draw(st.sampled_from((0, 1, 2, 3, 5, 6)))
        qk = torch.randn((shape + [2, 2])[:rank], dtype=dtype)
        error, match = ValueError, f"{name} must have 4 dimensions"
    elif defect == "branches":
        shape[0] = draw(st.sampled_from([k for k in range(1, 7) if k != branches]))
        qk = torch.randn(shape, dtype=dtype)
        error, match = ValueError, f"{name} must hold {branches} branches"
    elif defect == "empty":
        dim = draw(st.integers(1, 3))
        shape[dim] = 0
        qk = torch.randn(shape, dtype=dtype)
        error, match = ValueError, f"{name} has an empty dimension {'BNC'[dim - 1]}"
    elif defect == "theta_dtype":
        theta = theta.to(draw(st.sampled_from([t for t in DTYPES if t != dtype])))
        error, match = TypeError, "theta has dtype"
    elif defect == "theta_device":
        theta = theta.to("meta")
        error, match = ValueError, "theta is on meta"
    elif defect == "theta_shape":
        theta = torch.zeros(draw(st.sampled_from(((2,), (1, 2), (0,), (3, 1)))), dtype=dtype)
        error, match = ValueError, "theta must hold exactly one element"
    elif defect == "gamma":
        kw["gamma"] = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
        error, match = ValueError, "gamma must be finite"
    elif defect == "integer_dtype":
        qk = torch.ones(shape, dtype=draw(st.sampled_from((torch.int64, torch.int32, torch.bool))))
        error, match = TypeError, f"{name} must have a floating dtype"
    elif defect == "mode":
        kw["mode"] = draw(st.sampled_from(("", "SD", "ds", "sd ", None, 1)))
        error, match = ValueError, "mode must be one of"
    elif defect == "scope":
        kw["scope"] = draw(st.sampled_from(("", "global", "Batch", None)))
        error, match = ValueError, "scope must be one of"
    else:  # not_tensor
        qk = draw(st.sampled_from(([1.0], 1.0, None, "qk")))
        error, match = TypeError, f"{name} must be a torch.Tensor"
    return pair, qk, theta, kw, error, match


def _public_ops():
    ops = [("cpu", qcs_ext), ("reference", ref)]
    return ops + ([("emulated", em)] if em is not None else [])


@settings(max_examples=BAD_EXAMPLES)
@given(call=bad_calls())
def test_bad_input_raises_clear_error(call):
    """Each public op (CPU, emulated, reference) raises the same named error."""
    pair, qk, theta, kw, error, match = call
    for name, module in _public_ops():
        with pytest.raises(error, match=match):
            if pair:
                module.pair_similarity_maps(qk, **kw)
            else:
                module.cross_similarity_maps(qk, theta, **kw)
        note(f"{name}: raised {error.__name__} matching {match!r}")


# ---- non-finite input --------------------------------------------------------------------

def _ops_under_test(pair: bool):
    ops = [("cpu", qcs_ext), ("reference", ref)] + ([("emulated", em)] if em is not None else [])
    return [(name, m.pair_similarity_maps if pair else m.cross_similarity_maps) for name, m in ops]


@settings(max_examples=max(10, CPU_EXAMPLES // 10))
@given(pair=st.booleans(), dtype=st.sampled_from((torch.float32, torch.float64)),
       b=st.integers(1, 3), n=st.integers(1, 6), c=st.integers(1, 4),
       bad=st.sampled_from((math.nan, math.inf, -math.inf)),
       scope=st.sampled_from(("batch", "sample")), mode=st.sampled_from(("sd", "s", "d")),
       where=st.integers(0, 2**31 - 1), seed=st.integers(0, 2**31 - 1))
def test_non_finite_input_gives_non_finite_maps(pair, dtype, b, n, c, bad, scope, mode, where,
                                                seed):
    """A NaN or Inf in a token never yields a finite-looking answer: the map row of that
    token's own branch and sample is non-finite (as in the reference), whatever else the
    implementation lets it spread to."""
    branches = 2 if pair else 4
    qk = _values("gaussian", (branches, b, n, c), dtype, 0.0, seed)
    flat = qk.view(-1)
    flat[where % flat.numel()] = bad
    branch, sample = divmod((where % flat.numel()) // (n * c), b)
    theta = torch.tensor(0.4, dtype=dtype)
    kw = {"scope": scope} if pair else {"mode": mode, "scope": scope}
    for name, fn in _ops_under_test(pair):
        maps = fn(qk, **kw) if pair else fn(qk, theta, **kw)
        assert not torch.isfinite(maps[branch, sample]).all(), (
            f"{name}: finite map for branch {branch}, sample {sample} whose input holds {bad}")


# ---- regressions found by the properties above -------------------------------------------

@pytest.mark.emulated
@needs_emulation
@pytest.mark.parametrize("kind", ["nan_token", "float32_overflow"])
def test_emulated_distance_keeps_nan(kind):
    """The CUDA distance kernel clamped ``d^2`` with ``d2 > 0 ? d2 : 0``, which also turned
    NaN (a NaN token, or squared norms and Gram products overflowing float32: ``inf - inf``)
    into a distance of 0, so the op returned finite, wrong maps where the reference (and
    the CPU op) return NaN."""
    if kind == "nan_token":
        qk = torch.ones(4, 1, 2, 1)
        qk[0, 0, 0, 0] = math.nan
    else:  # the example hypothesis found: Gaussian tokens of scale 1e20 in float32
        qk = _values("gaussian", (4, 2, 5, 7), torch.float32, 20.0, 0)
    theta = torch.tensor(0.2)
    assert not torch.isfinite(ref.cross_similarity_maps(qk, theta)[0, 0]).all()
    assert not torch.isfinite(em.cross_similarity_maps(qk, theta)[0, 0]).all()
    assert not torch.isfinite(em.pair_similarity_maps(qk[:2])[0, 0]).all()


@pytest.mark.emulated
@needs_emulation
@pytest.mark.parametrize("scale_exp", [13.0, 17.0])
@pytest.mark.parametrize("pair", [False, True], ids=["cross", "pair"])
def test_emulated_gradient_at_large_scale(scale_exp, pair):
    """The CUDA backward computed ``w * alpha / (r * r * r)`` in float32: ``r^3`` overflowed
    for row norms from ~7e12 (inputs of that scale, inside the domain), the term became 0
    and the gradient came out about twice the reference's."""
    qk = _values("gaussian", (2 if pair else 4, 1, 2, 1), torch.float32, scale_exp, 0)
    theta = None if pair else torch.tensor(0.0)
    kw = {} if pair else {"mode": "s"}
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(qk.shape[:3], generator=gen, dtype=torch.float64)
    em_fn = em.pair_similarity_maps if pair else em.cross_similarity_maps
    ref_fn = ref.pair_similarity_maps if pair else ref.cross_similarity_maps
    _, got = maps_and_grads(em_fn, qk, theta, grad_out, **kw)
    _, want = maps_and_grads(ref_fn, qk.double(), None if pair else theta.double(), grad_out, **kw)
    err = (got[0].double() - want[0]).abs().max().item()
    assert err <= 1e-4 * want[0].abs().max().item(), (err, want[0].abs().max().item())


def _native_gamma_cases():
    cases = []
    namespaces = [("qcs_ext", lambda: torch.ops.qcs_ext)]
    if em is not None:
        namespaces.append(("qcs_emulated", lambda: em.ops))
    for name, ops in namespaces:
        for which in ("forward", "backward"):
            cases.append(pytest.param(ops, which, id=f"{name}-{which}"))
    return cases


@pytest.mark.parametrize("ops,which", _native_gamma_cases())
@pytest.mark.parametrize("gamma", [math.nan, math.inf])
def test_native_ops_refuse_non_finite_gamma(ops, which, gamma):
    """torch.ops.* are public too: a non-finite gamma is refused there, not only by the
    Python wrapper (the CUDA host code did not check it and returned NaN maps)."""
    ops = ops()
    qk = torch.randn(4, 2, 3, 2, dtype=torch.float64)
    theta = torch.zeros((), dtype=torch.float64)
    maps, dist, ext = ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch")
    with pytest.raises(ValueError, match="gamma must be finite"):
        if which == "forward":
            ops.cross_similarity_forward(qk, theta, gamma, "sd", "batch")
        else:
            ops.cross_similarity_backward(torch.ones_like(maps), maps, qk, dist, ext, theta, gamma,
                                          "sd", "batch")


def _native_namespaces():
    return [torch.ops.qcs_ext] + ([em.ops] if em is not None else [])


@pytest.mark.parametrize("ops", _native_namespaces(), ids=lambda ops: ops.__name__.split(".")[-1])
def test_native_ops_refuse_meta_tensor_beside_real_ones(ops):
    """A meta ``theta`` beside a CPU ``qk`` dispatched to the fake kernel, which returned
    uninitialised CPU tensors as maps; now it raises like the Python wrappers do."""
    qk = torch.randn(4, 2, 3, 2)
    theta = torch.zeros(())
    maps, dist, ext = ops.cross_similarity_forward(qk, theta, 1.0, "sd", "batch")
    with pytest.raises(ValueError, match="theta is on meta but qk is on cpu"):
        ops.cross_similarity_forward(qk, theta.to("meta"), 1.0, "sd", "batch")
    with pytest.raises(ValueError, match="distances is on meta but qk is on cpu"):
        ops.cross_similarity_backward(maps, maps, qk, dist.to("meta"), ext, theta, 1.0, "sd",
                                      "batch")
    pair_maps, pair_dist, pair_ext = ops.pair_similarity_forward(qk[:2], "batch")
    with pytest.raises(ValueError, match="maps is on meta but qk is on cpu"):
        ops.pair_similarity_backward(pair_maps, pair_maps.to("meta"), qk[:2], pair_dist, pair_ext,
                                     "batch")
