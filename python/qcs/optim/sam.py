"""Sharpness-Aware Minimisation (Foret et al. 2020) around any torch optimizer.

One SAM step is two forward/backward passes::

    loss(w).backward();        sam.first_step()   # w <- w + e(w), e = rho * g / ||g||
    loss(w + e).backward();    sam.second_step()  # w <- w - e; base optimizer step with
                                                  # the gradient taken at w + e

With ``adaptive=True`` (ASAM) the perturbation is scaled per element by ``|w|``:
``e = rho * w^2 g / ||w g||``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SAM"]


class SAM:
    """Wraps ``base`` (an optimizer over the same parameters).

    Args:
        base: the optimizer that takes the actual step (Adam / AdamW / SGD).
        rho: radius of the neighbourhood (paper: 0.05).
        adaptive: ASAM scaling.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05,
                 adaptive: bool = False) -> None:
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self._eps: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def _params(self):
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """``||g||`` (or ``||w g||`` when adaptive) over every parameter with a gradient."""
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).norm(2) for p in self._params()]
        if not norms:
            return torch.zeros(())
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to ``w + e`` using the current gradients; then zero them."""
        scale = self.rho / (self.grad_norm() + 1e-12)
        self._eps.clear()
        for p in self._params():
            e = (p * p if self.adaptive else 1.0) * p.grad * scale.to(p.device)
            p.add_(e)
            self._eps[p] = e
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Return to ``w`` (keeping the gradients taken at ``w + e``)."""
        for p, e in self._eps.items():
            p.sub_(e)
        self._eps.clear()

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to ``w`` and let the base optimizer step with the gradient at ``w + e``."""
        self.restore()
        self.base.step()
        self.base.zero_grad(set_to_none=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)
