"""Helpers shared by the op test suites: the backends, maps and gradients of a call, and
the one comparator of an op's result against the float64 reference."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import qcs_ext

IN_CI = os.environ.get("CI", "").lower() == "true"


def maps_and_grads(fn, qk, theta, grad_out, **kw):
    """Maps of ``fn`` at (qk, theta) (``theta=None`` for the pair op) and the gradients of
    ``sum(maps * grad_out)`` with respect to the inputs, zeros where one is unused."""
    qk = qk.detach().clone().requires_grad_(True)
    inputs = [qk]
    if theta is not None:
        theta = theta.detach().clone().requires_grad_(True)
        inputs.append(theta)
        out = fn(qk, theta, **kw)
    else:
        out = fn(qk, **kw)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return out.detach(), [g.detach() for g in grads]


def assert_matches_reference(name: str, got: torch.Tensor, exp: torch.Tensor, *,
                             low: torch.Tensor | None = None, rel: float,
                             scale_floor: float = 0.0, floor: float = 0.0) -> None:
    """The one comparator of the op tests: ``got`` (an op's result, any dtype) against
    ``exp`` (the reference in float64 on the same input values).

    ``|got - exp| <= 2 |low - exp| + rel * max(max|exp|, scale_floor) + floor``, where
    ``low`` is the reference run in the op's own lower precision (flash-attention style:
    the op may be at most twice as wrong as the reference is in that precision; omitted for
    float64) and ``floor`` an absolute allowance the caller derives (rounding of the
    result, the reference's sensitivity to the distance errors a kernel may make).
    ``got`` must also be finite.
    """
    got, exp = got.double(), exp.double()
    assert torch.isfinite(got).all(), f"{name}: not finite"
    scale = exp.abs().max().item() if exp.numel() else 0.0
    err = (got - exp).abs().max().item() if exp.numel() else 0.0
    ref_err = 0.0 if low is None else (low.double() - exp).abs().max().item()
    tol = 2 * ref_err + rel * max(scale, scale_floor) + floor + 1e-300
    assert err <= tol, (f"{name}: max error {err:.3e} > {tol:.3e} (largest magnitude {scale:.3e}"
                        + (f", reference's own error {ref_err:.3e})" if low is not None else ")"))


# ---- backends ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One implementation of the CSA ops under test."""

    name: str
    device: str
    cross: Callable[..., torch.Tensor]  # cross_similarity_maps
    pair: Callable[..., torch.Tensor]  # pair_similarity_maps
    ops: Any  # the torch.ops namespace of its library (torch.ops.qcs_ext, ...)
    native_dtypes: tuple[torch.dtype, ...]  # dtypes its kernels take without a cast


def available_isas() -> list[str]:
    """The instruction sets of the CPU kernels this machine can run (QCS_CPU_ISA values)."""
    isas = ["baseline"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags and " fma " in flags:
        isas.append("avx2")
    if all(f" {f} " in flags for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq")):
        isas.append("avx512")
    return isas


def backend_params() -> list:
    """pytest params of every backend: the CPU kernels per instruction set, the CUDA
    kernels under emulation (marked ``emulated``) and on a GPU (marked ``cuda``)."""
    params = [pytest.param(f"cpu-{isa}", id=f"cpu-{isa}") for isa in available_isas()]
    params.append(pytest.param("emulated", id="emulated", marks=pytest.mark.emulated))
    params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return params


def make_backend(name: str, monkeypatch) -> Backend:
    """The :class:`Backend` called ``name``; skips (fails in CI for the emulation) where it
    is not available. ``cpu-ISA`` forces that instruction set through ``QCS_CPU_ISA``."""
    if name.startswith("cpu-"):
        isa = name[len("cpu-"):]
        monkeypatch.setenv("QCS_CPU_ISA", isa)
        assert torch.ops.qcs_ext.cpu_isa() == isa
        return Backend(name, "cpu", qcs_ext.cross_similarity_maps, qcs_ext.pair_similarity_maps,
                       torch.ops.qcs_ext, qcs_ext.ops.NATIVE_DTYPES["cpu"])
    if name == "emulated":
        try:
            import qcs_ext.emulated as em
        except ImportError as exc:  # pragma: no cover - depends on the build
            if IN_CI:
                raise  # CI builds the emulation: its absence is a build failure
            pytest.skip(f"qcs_ext._emulated not built ({exc})")
        return Backend(name, "cpu", em.cross_similarity_maps, em.pair_similarity_maps, em.ops,
                       em.NATIVE_DTYPES["cpu"])
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if not qcs_ext.has_fused_kernel("cuda"):
            pytest.fail("a GPU is present but qcs_ext._C was built without the CUDA kernels")
        return Backend(name, "cuda", qcs_ext.cross_similarity_maps, qcs_ext.pair_similarity_maps,
                       torch.ops.qcs_ext, qcs_ext.ops.NATIVE_DTYPES["cuda"])
    raise ValueError(f"unknown backend {name!r}")
