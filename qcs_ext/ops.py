"""Fused CSA ops: Python wrappers, fake (meta) kernels and autograd registration.

The op path, file by file (every name below greps to the next):

- ``csrc/schemas.h``: the schemas of ``cross_similarity_forward``/``_backward`` and
  ``pair_similarity_forward``/``_backward``, declared in ``csrc/ops.cpp``;
- ``csrc/cpu/csa_cpu.cpp`` and ``csrc/cuda/csa_host.h``: the kernels, registered by
  ``register_kernels`` for the CPU and CUDA dispatch keys; both check their arguments
  with ``csrc/csa_checks.h``, whose messages are those of :mod:`qcs_ext._checks`;
- this module: the fake kernels (shapes only, for ``torch.compile`` and meta tensors),
  autograd (the backward op), and the public functions, which check their arguments,
  cast dtypes the kernels lack and call ``torch.ops.qcs_ext.*``.

The emulated build of the CUDA kernels (:mod:`qcs_ext.emulated`) registers the same
Python pieces for its own library, ``qcs_emulated``.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import reference
from ._checks import SCOPES, check_choice, check_cross_args, check_features
from ._native import load_or_warn

# Importing qcs_ext._C registers the native ops; None when it did, else why not (warned).
NATIVE_PROBLEM = load_or_warn("_C")

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "has_fused_kernel", "NATIVE_PROBLEM"]

_HALF_TYPES = (torch.float16, torch.bfloat16)

# Per device type, the dtypes the qcs_ext kernels take; other floating dtypes are computed
# in float32 and the maps cast back.
NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, *_HALF_TYPES),
}


def aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved distances/extrema: half types keep them in float32."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


# ---- fake kernels: shapes and dtypes only (torch.compile, meta tensors) ------------------


def _same_device(qk: torch.Tensor, **others: torch.Tensor) -> None:
    """A meta tensor beside real ones sends the call to the fake kernel, not to the kernels:
    without this check the caller got uninitialised real tensors back as results."""
    for name, t in others.items():
        if t.device != qk.device:
            raise ValueError(f"{name} is on {t.device} but qk is on {qk.device}; they must match")


def cross_forward_fake(qk, theta, gamma, mode, scope):
    """Fake ``cross_similarity_forward``: maps ``[4, B, N]``, distances ``[4, B, N, N]``,
    extrema ``[4, B]``."""
    _same_device(qk, theta=theta)
    _, batch, tokens, _ = qk.shape
    aux = aux_dtype(qk.dtype)
    return (
        qk.new_empty((4, batch, tokens)),
        qk.new_empty((4, batch, tokens, tokens), dtype=aux),
        qk.new_empty((4, batch), dtype=aux),
    )


def cross_backward_fake(grad_maps, maps, qk, distances, extrema, theta, gamma, mode, scope):
    """Fake ``cross_similarity_backward``: gradients shaped like ``qk`` and ``theta``."""
    _same_device(qk, grad_maps=grad_maps, maps=maps, distances=distances, extrema=extrema,
                 theta=theta)
    return torch.empty_like(qk), torch.empty_like(theta)


def pair_forward_fake(qk, scope):
    """Fake ``pair_similarity_forward``: maps ``[2, B, N]``, distances ``[1, B, N, N]``,
    extrema ``[1, B]``."""
    _, batch, tokens, _ = qk.shape
    aux = aux_dtype(qk.dtype)
    return (
        qk.new_empty((2, batch, tokens)),
        qk.new_empty((1, batch, tokens, tokens), dtype=aux),
        qk.new_empty((1, batch), dtype=aux),
    )


def pair_backward_fake(grad_maps, maps, qk, distances, extrema, scope):
    """Fake ``pair_similarity_backward``: a gradient shaped like ``qk``."""
    _same_device(qk, grad_maps=grad_maps, maps=maps, distances=distances, extrema=extrema)
    return torch.empty_like(qk)


# ---- autograd: saved are qk (an input, not a copy), the maps, and the distance matrices
# with their extrema; norms, aggregations and tie positions are recomputed. --------------


def cross_setup_context(ctx, inputs, output):
    """Save what ``cross_similarity_backward`` takes back."""
    qk, theta, gamma, mode, scope = inputs
    maps, distances, extrema = output
    ctx.save_for_backward(qk, theta, maps, distances, extrema)
    ctx.gamma, ctx.mode, ctx.scope = gamma, mode, scope
    ctx.mark_non_differentiable(distances, extrema)
    # The non-differentiable outputs' gradients stay None rather than being materialised
    # as zeros (the distances' are as large as the saved matrices).
    ctx.set_materialize_grads(False)


def cross_backward(backward_op, ctx, grad_maps, _grad_distances, _grad_extrema):
    """Gradients of ``qk`` and ``theta`` through ``backward_op``
    (``torch.ops.<library>.cross_similarity_backward.default``)."""
    if grad_maps is None:
        return None, None, None, None, None
    qk, theta, maps, distances, extrema = ctx.saved_tensors
    grad_qk, grad_theta = backward_op(
        grad_maps.contiguous(), maps, qk, distances, extrema, theta, ctx.gamma, ctx.mode, ctx.scope
    )
    return grad_qk, grad_theta, None, None, None


def pair_setup_context(ctx, inputs, output):
    """Save what ``pair_similarity_backward`` takes back."""
    qk, scope = inputs
    maps, distances, extrema = output
    ctx.save_for_backward(qk, maps, distances, extrema)
    ctx.scope = scope
    ctx.mark_non_differentiable(distances, extrema)
    ctx.set_materialize_grads(False)


def pair_backward(backward_op, ctx, grad_maps, _grad_distances, _grad_extrema):
    """Gradient of ``qk`` through ``backward_op``
    (``torch.ops.<library>.pair_similarity_backward.default``)."""
    if grad_maps is None:
        return None, None
    qk, maps, distances, extrema = ctx.saved_tensors
    return backward_op(grad_maps.contiguous(), maps, qk, distances, extrema, ctx.scope), None


if NATIVE_PROBLEM is None:  # without the native ops there is nothing to register
    torch.library.register_fake("qcs_ext::cross_similarity_forward", cross_forward_fake)
    torch.library.register_fake("qcs_ext::cross_similarity_backward", cross_backward_fake)
    torch.library.register_fake("qcs_ext::pair_similarity_forward", pair_forward_fake)
    torch.library.register_fake("qcs_ext::pair_similarity_backward", pair_backward_fake)
    torch.library.register_autograd(
        "qcs_ext::cross_similarity_forward",
        functools.partial(cross_backward, torch.ops.qcs_ext.cross_similarity_backward.default),
        setup_context=cross_setup_context,
    )
    torch.library.register_autograd(
        "qcs_ext::pair_similarity_forward",
        functools.partial(pair_backward, torch.ops.qcs_ext.pair_similarity_backward.default),
        setup_context=pair_setup_context,
    )


# ---- kernel images: a CUDA build may have no image (SASS or PTX) a newer GPU can run --------


class KernelImages:
    """Whether a library's kernel images run on a device, asked once per device.

    Args:
        namespace: the ``TORCH_LIBRARY`` namespace; its ``kernel_image_fits(int) -> bool``
            op answers (libraries without it have no images to miss).
        image_device: the device type whose kernels are CUDA kernel images (``"cuda"``;
            ``"cpu"`` for the emulation, which plays CUDA kernels on the CPU).
    """

    def __init__(self, namespace: str, image_device: str) -> None:
        self.namespace, self.image_device = namespace, image_device
        self._image_cache: dict[int, bool] = {}

    @torch.compiler.assume_constant_result
    def fits(self, device: torch.device) -> bool:
        """Whether the build has a kernel image that runs on ``device`` (False where torch
        sees no GPU); always True for devices of another type than ``image_device``. A
        device without one gets a warning, once."""
        if device.type != self.image_device:  # first: the common CPU call stops here
            return True
        ops = getattr(torch.ops, self.namespace)
        if not hasattr(ops, "kernel_image_fits"):
            return True
        if device.type == "cuda" and not torch.cuda.is_available():
            return False  # no GPU at all: nothing for the kernels to run on
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        fits = self._image_cache.get(index)
        if fits is None:
            fits = self._image_cache[index] = bool(ops.kernel_image_fits(index))
            if not fits:
                warnings.warn(f"qcs_ext: no kernel image of this build runs on {device}; the "
                              "CSA ops fall back to qcs_ext.reference there (rebuild qcs-ext "
                              "with a CUDA toolkit that knows this GPU)", RuntimeWarning,
                              stacklevel=3)
        return fits


IMAGES = KernelImages("qcs_ext", "cuda")


# ---- the public functions ---------------------------------------------------------------


def run_cross(forward_op, native_dtypes, images, qk, theta, gamma, mode, scope) -> torch.Tensor:
    """Check the arguments, call ``forward_op`` (a ``cross_similarity_forward`` op) in a
    dtype its kernels take (``native_dtypes``: per device type) and return the maps in
    ``qk``'s dtype; the reference where ``images`` (:class:`KernelImages`) has no kernel
    image for ``qk``'s device."""
    qk, theta, gamma, mode, scope = check_cross_args(qk, theta, gamma, mode, scope)
    if not images.fits(qk.device):
        return reference.cross_similarity_maps(qk, theta, gamma=gamma, mode=mode, scope=scope)
    compute = qk.dtype if qk.dtype in native_dtypes.get(qk.device.type, ()) else torch.float32
    if compute == qk.dtype:  # the usual case: no cast calls (each costs on this path)
        return forward_op(qk.contiguous(), theta, gamma, mode, scope)[0]
    maps = forward_op(qk.to(compute).contiguous(), theta.to(compute), gamma, mode, scope)[0]
    return maps.to(qk.dtype)


def run_pair(forward_op, native_dtypes, images, qk2, scope) -> torch.Tensor:
    """:func:`run_cross` for a ``pair_similarity_forward`` op."""
    qk2 = check_features(qk2, "qk2", 2)
    scope = check_choice(scope, "scope", SCOPES)
    if not images.fits(qk2.device):
        return reference.pair_similarity_maps(qk2, scope=scope)
    compute = qk2.dtype if qk2.dtype in native_dtypes.get(qk2.device.type, ()) else torch.float32
    if compute == qk2.dtype:
        return forward_op(qk2.contiguous(), scope)[0]
    return forward_op(qk2.to(compute).contiguous(), scope)[0].to(qk2.dtype)


def cross_similarity_maps(
    qk: torch.Tensor,
    theta: torch.Tensor,
    *,
    gamma: float = 1.0,
    mode: str = "sd",
    scope: str = "batch",
) -> torch.Tensor:
    """Quadruplet CSA maps with the fused kernels; same contract as
    :func:`qcs_ext.reference.cross_similarity_maps`.

    Args:
        qk: ``[4, B, N, C]`` query/key features of the branches ``a, p, n, n2``
            (any strides and layout).
        theta: 0-dim tensor, same dtype and device as ``qk``.
        gamma: finite float, ``k = gamma + tanh(theta)``.
        mode: ``"sd"``, ``"s"`` or ``"d"``.
        scope: ``"batch"`` or ``"sample"``.

    Returns:
        ``[4, B, N]`` softmax maps, dtype of ``qk``.
    """
    _require_native()
    return run_cross(torch.ops.qcs_ext.cross_similarity_forward.default, NATIVE_DTYPES, IMAGES,
                     qk, theta, gamma, mode, scope)


def pair_similarity_maps(qk2: torch.Tensor, *, scope: str = "batch") -> torch.Tensor:
    """Pair CSA maps (DCS) with the fused kernels; same contract as
    :func:`qcs_ext.reference.pair_similarity_maps`.

    Args:
        qk2: ``[2, B, N, C]`` query/key features of the branches ``a, p``.
        scope: ``"batch"`` or ``"sample"``.

    Returns:
        ``[2, B, N]`` softmax maps, dtype of ``qk2``.
    """
    _require_native()
    return run_pair(torch.ops.qcs_ext.pair_similarity_forward.default, NATIVE_DTYPES, IMAGES,
                    qk2, scope)


def has_fused_kernel(device: torch.device | str) -> bool:
    """Whether qcs_ext has kernels that run on ``device`` (``"cpu"``; ``"cuda"`` when built
    with CUDA and a kernel image fits the GPU); always ``False`` when the native kernels did
    not load."""
    device = torch.device(device)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return NATIVE_PROBLEM is None and key is not None and \
        torch._C._dispatch_has_kernel_for_dispatch_key("qcs_ext::cross_similarity_forward",
                                                       key) and IMAGES.fits(device)


def _require_native() -> None:
    """The fused ops raise ``RuntimeError`` saying why when the native kernels are off
    (use :mod:`qcs_ext.reference`, or rebuild)."""
    if NATIVE_PROBLEM is not None:
        raise RuntimeError(NATIVE_PROBLEM)
