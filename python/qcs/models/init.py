"""Weight initialisation schemes a run can ask for (``model.init``), applied to a freshly
built network before any pretrained weights are loaded.

- ``default``: what each network's constructor does (linear layers truncated-normal with
  std 0.02, convolutions PyTorch's default).
- ``published``: the initialisation of the ViT in the QCS / POSTER++ authors' code: linear
  layers truncated-normal with std 0.01 and zero bias, convolutions Kaiming-normal
  (fan-out) with zero bias, LayerNorm weight 1 and bias 0.
- ``torch``: PyTorch's own initialisation of linear layers (uniform in
  ``+-1/sqrt(fan_in)``), convolutions Kaiming-normal (fan-out) with zero bias, LayerNorm
  weight 1 and bias 0. Larger than the two above: a network trained from scratch leaves
  its starting plateau sooner (``docs/training.md``).

Norm layers other than LayerNorm (BatchNorm) and parameters that are not in a linear,
convolution or LayerNorm layer (class tokens, position embeddings, CSA's theta) keep the
constructor's values.
"""

from __future__ import annotations

from torch import nn

__all__ = ["INIT_SCHEMES", "init_weights"]

INIT_SCHEMES = ("default", "published", "torch")


def _conv_fan_out(m: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(m.weight, mode="fan_out")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _init_module(m: nn.Module, scheme: str) -> None:
    if isinstance(m, nn.Linear):
        if scheme == "published":
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            m.reset_parameters()  # PyTorch's default (kaiming-uniform, a = sqrt(5))
    elif isinstance(m, nn.Conv2d):
        _conv_fan_out(m)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise ``model``'s weights with ``scheme`` (one of :data:`INIT_SCHEMES`;
    ``default`` leaves them as built) in place, drawing from torch's global RNG. Frozen
    sub-networks (every parameter ``requires_grad = False``) are left alone. Returns
    ``model``."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "default":
        return model
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            continue  # e.g. PCD's frozen landmark network (its weights come from a file)
        _init_module(m, scheme)
    return model
