"""Helpers shared by the op test suites (real CUDA kernels and their emulation)."""

from __future__ import annotations

import torch


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
