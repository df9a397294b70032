"""The guard behind ``Capabilities(double_backward=False)``: second-order gradients refuse clearly.

A variant whose backward is not differentiable again (a hand-written or fused backward, SDPA's
flash kernel) would otherwise give a second-order gradient that is silently 0 (a gradient with
``requires_grad=False``: a gradient penalty that does nothing) or fail deep inside torch.
``Attention.forward`` and ``decode`` pass query, key and value of such a variant through
``guard_second_order``: an identity whose backward, when autograd records a graph of the
gradient (``create_graph=True``, ``torch.func.grad``), marks the gradient it hands on; first-order
gradients (with or without a graph) are unchanged, and differentiating one of them again raises
``UnsupportedFeatureError`` naming the variant. It costs one autograd node per input, and
nothing when no input requires grad.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedFeatureError

__all__ = ["guard_second_order"]

_FEATURE = "second-order gradients (differentiating a gradient taken with create_graph=True)"
_HINT = ("Capabilities.double_backward is False; first-order gradients work, with or without "
         "create_graph")


class _Refuse(torch.autograd.Function):
    """Identity on a first-order gradient; differentiating through it raises. ``anchor`` (a
    scalar that requires grad, or None) makes the result require grad even when the variant's
    backward recorded no graph: a gradient penalty then fails loudly instead of doing nothing."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, anchor: Tensor | None, variant: str, hint: str) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.variant, ctx.hint = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None]:
        raise UnsupportedFeatureError(ctx.variant, _FEATURE, ctx.hint)


class _Guard(torch.autograd.Function):
    """Identity on an input; its backward marks the gradient when a graph of it is recorded."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, variant: str, hint: str) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.variant, ctx.hint = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if not torch.is_grad_enabled():  # a plain backward
            return grad, None, None
        # create_graph=True (or torch.func): a graph of this gradient is recorded.
        anchor = None
        if not grad.requires_grad:  # the variant's backward recorded none: still refuse loudly
            try:
                anchor = grad.new_zeros(()).requires_grad_(True)
            except RuntimeError:  # inside a torch.func transform, which tracks the graph itself
                return grad, None, None
        return _Refuse.apply(grad, anchor, ctx.variant, ctx.hint), None, None


def guard_second_order(variant: str, *tensors: Tensor, hint: str = _HINT) -> tuple[Tensor, ...]:
    """``tensors`` unchanged (as views), guarded where they require grad under grad mode;
    ``hint`` ends the error raised on differentiating their gradients again."""
    if not torch.is_grad_enabled():
        return tensors
    return tuple(_Guard.apply(t, variant, hint) if t.requires_grad else t for t in tensors)
