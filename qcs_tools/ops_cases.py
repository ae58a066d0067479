"""The benchmark cases of the CSA ops, shared by the pytest-benchmark suite and the table
script: each case is a zero-argument callable for one implementation at one shape.

Implementations, all on the same quadruplet and the same pairs:
  fused      qcs_ext.cross_similarity_maps (the native kernels)
  eager      qcs_ext.reference.cross_similarity_maps in eager PyTorch
  compiled   torch.compile of the reference
  sdpa       scaled dot-product cross attention on the same four pairs (the paper's baseline)
  gemms      the bare GEMMs the fused op must do: the 4 Gram products (forward), plus the
             8 gradient products of the backward (12 in all), through torch.bmm
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import qcs_ext
from qcs_ext import reference
from qcs_ext.memory import saved_tensor_bytes

# (B, N, C): the paper's shape, then the larger token grids of the issue.
SHAPES = [(24, 49, 768), (8, 196, 768), (8, 784, 768)]
IMPLEMENTATIONS = ("fused", "eager", "compiled", "sdpa", "gemms")


def make_inputs(shape, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    b, n, c = shape
    qk = torch.randn(4, b, n, c, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    theta = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
    return qk, theta


_compiled_reference = None


def _compiled():
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference.cross_similarity_maps, dynamic=False)
    return _compiled_reference


def _bare_gemms(qk: torch.Tensor, backward: bool) -> Callable[[], object]:
    a, p, n, n2 = qk.detach().unbind(0)
    rows_pn = torch.cat([p, n], dim=1)          # [B, 2N, C]: D_pa and D_na against a
    cols_np = torch.cat([n, p], dim=1)          # [B, 2N, C]: D_n2n and D_n2p for n2
    weights = torch.randn(qk.shape[1], qk.shape[2], qk.shape[2], dtype=qk.dtype, device=qk.device)

    def run():
        torch.bmm(rows_pn, a.transpose(1, 2))
        torch.bmm(n2, cols_np.transpose(1, 2))
        if backward:  # two products per distance matrix and side: 8 more
            for y in (a, p, n, n2, a, p, n, n2):
                torch.bmm(weights, y)

    return run


def case(
    impl: str, shape, backward: bool, dtype=torch.float32, device="cpu"
) -> Callable[[], object]:
    """A callable running one forward (or forward + backward) of ``impl`` at ``shape`` on
    ``device``; the backward takes a random upstream gradient (fixed seed), as in training
    (an all-ones gradient of a softmax output is a degenerate, cheaper case)."""
    qk, theta = make_inputs(shape, dtype, device=device)
    if impl == "gemms":
        return _bare_gemms(qk, backward)
    if impl == "sdpa":
        rows, cols = zip(*reference.SDPA_PAIRS)

        def forward():
            q = qk[list(rows)]
            kv = qk[list(cols)]
            return F.scaled_dot_product_attention(q, kv, kv)
    else:
        fn = {
            "fused": qcs_ext.cross_similarity_maps,
            "eager": reference.cross_similarity_maps,
            "compiled": _compiled(),
        }[impl]

        def forward():
            return fn(qk, theta)

    if not backward:

        def run_forward():
            with torch.no_grad():
                return forward()

        return run_forward

    with torch.no_grad():
        out_like = forward()
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(out_like.shape, generator=gen).to(device=device, dtype=out_like.dtype)

    def run_backward():
        out = forward()
        grads = torch.autograd.grad(
            out, (qk, theta) if impl != "sdpa" else (qk,), upstream, allow_unused=True
        )
        return grads

    return run_backward


def saved_bytes_ratio(impl: str, shape, dtype=torch.float32) -> float:
    """Bytes ``impl`` ("fused" or "eager") saves for backward beyond its input, relative
    to the input."""
    qk, theta = make_inputs(shape, dtype)
    fn = qcs_ext.cross_similarity_maps if impl == "fused" else reference.cross_similarity_maps
    return saved_tensor_bytes(fn, (qk, theta)) / (qk.numel() * qk.element_size())
