"""Measuring what autograd keeps for backward."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["saved_tensor_bytes"]


def saved_tensor_bytes(fn: Callable[..., object], inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages that ``fn(*inputs)`` saves for backward, not counting
    storages of ``inputs`` themselves (saving an input costs no memory)."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())
