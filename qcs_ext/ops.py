"""Fused CSA ops: Python wrappers, fake (meta) kernels and autograd registration.

The native kernels implement the ops declared in ``csrc/schemas.h``; this module gives
them the public signatures of :mod:`qcs_ext.reference`, registers their shape functions
for ``torch.compile`` and wires the backward op into autograd.

The same registration serves two libraries: ``qcs_ext`` (the CPU and CUDA kernels) and
``qcs_emulated`` (the CUDA kernel sources run on the host by the emulation layer, see
:mod:`qcs_ext.emulated`); :class:`OpBinding` holds one of them.
"""

from __future__ import annotations

import warnings

import torch

from . import _C  # noqa: F401  (importing it registers the native ops)
from . import reference
from ._checks import SCOPES, check_choice, check_cross_args, check_features

__all__ = ["cross_similarity_maps", "pair_similarity_maps", "has_fused_kernel", "OpBinding"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved distances/extrema: half types keep them in float32."""
    return torch.float32 if dtype in _HALF_TYPES else dtype


class OpBinding:
    """The Python side of one library of CSA ops.

    Registers fake kernels and autograd for ``{namespace}::cross_similarity_forward`` and
    ``{namespace}::pair_similarity_forward`` and exposes the public functions.

    Args:
        namespace: the ``TORCH_LIBRARY`` namespace holding the four ops.
        native_dtypes: per device type, the dtypes the kernels take; other floating
            dtypes are computed in float32 and the maps cast back.
        image_device: the device type whose kernels are CUDA kernel images, which a
            device may have no image for (``"cuda"``; ``"cpu"`` for the emulation).
    """

    def __init__(self, namespace: str, native_dtypes: dict[str, tuple[torch.dtype, ...]],
                 image_device: str = "cuda"):
        self.namespace = namespace
        self.native_dtypes = native_dtypes
        self.image_device = image_device
        self._image_cache: dict[int, bool] = {}
        self.ops = getattr(torch.ops, namespace)
        self._register()

    def has_kernel(self, device: torch.device | str) -> bool:
        """Whether this library has kernels for ``device`` that run on it."""
        device = torch.device(device)
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{self.namespace}::cross_similarity_forward", key
        ) and self.image_fits(device)

    @torch.compiler.assume_constant_result
    def image_fits(self, device: torch.device) -> bool:
        """Whether the build has a kernel image (SASS or PTX) that runs on ``device``
        (False where torch sees no GPU); always True for devices of another type than
        ``image_device``. Asked once per device; a device without one gets a warning."""
        if device.type != self.image_device or not hasattr(self.ops, "kernel_image_fits"):
            return True
        if device.type == "cuda" and not torch.cuda.is_available():
            return False  # no GPU at all: nothing for the kernels to run on
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        fits = self._image_cache.get(index)
        if fits is None:
            fits = self._image_cache[index] = bool(self.ops.kernel_image_fits(index))
            if not fits:
                warnings.warn(f"qcs_ext: no kernel image of this build runs on {device}; "
                              "the CSA ops fall back to qcs_ext.reference there (rebuild qcs-ext "
                              "with a CUDA toolkit that knows this GPU)", RuntimeWarning, stacklevel=3)
        return fits

    def _compute_dtype(self, qk: torch.Tensor) -> torch.dtype:
        native = self.native_dtypes.get(qk.device.type, ())
        return qk.dtype if qk.dtype in native else torch.float32

    def _register(self) -> None:
        ns, ops = self.namespace, self.ops

        def same_device(qk, **others):
            # A meta tensor beside real ones sends the call here, not to the kernels: without
            # this check the caller got uninitialised real tensors back as results.
            for name, t in others.items():
                if t.device != qk.device:
                    raise ValueError(f"{name} is on {t.device} but qk is on {qk.device}; they must match")

        # Fake kernels: shapes and dtypes only (torch.compile, meta tensors).
        def cross_forward_fake(qk, theta, gamma, mode, scope):
            same_device(qk, theta=theta)
            _, batch, tokens, _ = qk.shape
            aux = aux_dtype(qk.dtype)
            return (
                qk.new_empty((4, batch, tokens)),
                qk.new_empty((4, batch, tokens, tokens), dtype=aux),
                qk.new_empty((4, batch), dtype=aux),
            )

        def cross_backward_fake(grad_maps, maps, qk, distances, extrema, theta, gamma, mode, scope):
            same_device(qk, grad_maps=grad_maps, maps=maps, distances=distances, extrema=extrema, theta=theta)
            return torch.empty_like(qk), torch.empty_like(theta)

        def pair_forward_fake(qk, scope):
            _, batch, tokens, _ = qk.shape
            aux = aux_dtype(qk.dtype)
            return (
                qk.new_empty((2, batch, tokens)),
                qk.new_empty((1, batch, tokens, tokens), dtype=aux),
                qk.new_empty((1, batch), dtype=aux),
            )

        def pair_backward_fake(grad_maps, maps, qk, distances, extrema, scope):
            same_device(qk, grad_maps=grad_maps, maps=maps, distances=distances, extrema=extrema)
            return torch.empty_like(qk)

        torch.library.register_fake(f"{ns}::cross_similarity_forward", cross_forward_fake)
        torch.library.register_fake(f"{ns}::cross_similarity_backward", cross_backward_fake)
        torch.library.register_fake(f"{ns}::pair_similarity_forward", pair_forward_fake)
        torch.library.register_fake(f"{ns}::pair_similarity_backward", pair_backward_fake)

        # Autograd. Saved: qk (an input, not a copy), the maps, and the distance matrices
        # with their extrema; norms, aggregations and tie positions are recomputed.
        def cross_setup_context(ctx, inputs, output):
            qk, theta, gamma, mode, scope = inputs
            maps, distances, extrema = output
            ctx.save_for_backward(qk, theta, maps, distances, extrema)
            ctx.gamma, ctx.mode, ctx.scope = gamma, mode, scope
            ctx.mark_non_differentiable(distances, extrema)
            # The non-differentiable outputs' gradients stay None rather than being
            # materialised as zeros (the distances' are as large as the saved matrices).
            ctx.set_materialize_grads(False)

        def cross_backward(ctx, grad_maps, _grad_distances, _grad_extrema):
            if grad_maps is None:
                return None, None, None, None, None
            qk, theta, maps, distances, extrema = ctx.saved_tensors
            grad_qk, grad_theta = ops.cross_similarity_backward.default(
                grad_maps.contiguous(), maps, qk, distances, extrema, theta,
                ctx.gamma, ctx.mode, ctx.scope,
            )
            return grad_qk, grad_theta, None, None, None

        def pair_setup_context(ctx, inputs, output):
            qk, scope = inputs
            maps, distances, extrema = output
            ctx.save_for_backward(qk, maps, distances, extrema)
            ctx.scope = scope
            ctx.mark_non_differentiable(distances, extrema)
            ctx.set_materialize_grads(False)

        def pair_backward(ctx, grad_maps, _grad_distances, _grad_extrema):
            if grad_maps is None:
                return None, None
            qk, maps, distances, extrema = ctx.saved_tensors
            grad_qk = ops.pair_similarity_backward.default(
                grad_maps.contiguous(), maps, qk, distances, extrema, ctx.scope
            )
            return grad_qk, None

        torch.library.register_autograd(
            f"{ns}::cross_similarity_forward", cross_backward, setup_context=cross_setup_context
        )
        torch.library.register_autograd(
            f"{ns}::pair_similarity_forward", pair_backward, setup_context=pair_setup_context
        )

    def cross_similarity_maps(
        self,
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
        qk, theta, gamma, mode, scope = check_cross_args(qk, theta, gamma, mode, scope)
        if qk.device.type == self.image_device and not self.image_fits(qk.device):
            return reference.cross_similarity_maps(qk, theta, gamma=gamma, mode=mode, scope=scope)
        compute = self._compute_dtype(qk)
        cast = compute != qk.dtype  # usually not: then no cast calls (each costs on this path)
        maps = self.ops.cross_similarity_forward.default(
            (qk.to(compute) if cast else qk).contiguous(), theta.to(compute) if cast else theta,
            gamma, mode, scope,
        )[0]
        return maps.to(qk.dtype) if cast else maps

    def pair_similarity_maps(self, qk2: torch.Tensor, *, scope: str = "batch") -> torch.Tensor:
        """Pair CSA maps (DCS) with the fused kernels; same contract as
        :func:`qcs_ext.reference.pair_similarity_maps`.

        Args:
            qk2: ``[2, B, N, C]`` query/key features of the branches ``a, p``.
            scope: ``"batch"`` or ``"sample"``.

        Returns:
            ``[2, B, N]`` softmax maps, dtype of ``qk2``.
        """
        qk2 = check_features(qk2, "qk2", 2)
        scope = check_choice(scope, "scope", SCOPES)
        if qk2.device.type == self.image_device and not self.image_fits(qk2.device):
            return reference.pair_similarity_maps(qk2, scope=scope)
        compute = self._compute_dtype(qk2)
        cast = compute != qk2.dtype
        maps = self.ops.pair_similarity_forward.default(
            (qk2.to(compute) if cast else qk2).contiguous(), scope
        )[0]
        return maps.to(qk2.dtype) if cast else maps


_binding = OpBinding(
    "qcs_ext",
    {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64, *_HALF_TYPES)},
)
cross_similarity_maps = _binding.cross_similarity_maps
pair_similarity_maps = _binding.pair_similarity_maps
has_fused_kernel = _binding.has_kernel
