"""Dense softmax attention math: the oracle every softmax-family variant is checked against.

Readable on purpose: logits + masks -> masked softmax -> weights @ V. ``masked_softmax`` is also
safe to use on fast paths (a row with nothing to attend gives weights 0, never NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import Masks

__all__ = ["masked_softmax", "softmax_attention_reference", "dot_product_logits"]


def masked_softmax(scores: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Softmax over the last dim where ``allowed``; rows with nothing allowed give all zeros.

    ``scores`` may already hold ``-inf`` (from a float mask); gradients stay finite.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))  # (..., Lq, Lk)
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # (..., Lq, 1); cancels mathematically
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max)  # (..., Lq, Lk); exp(-inf) = 0 on masked entries
    denom = expd.sum(dim=-1, keepdim=True)  # (..., Lq, 1)
    return expd / torch.where(denom > 0, denom, torch.ones_like(denom))


def dot_product_logits(query: Tensor, key: Tensor, scale: float | None) -> Tensor:
    """``scale * Q K^T`` with the SDPA default scale 1/sqrt(E)."""
    s = scale if scale is not None else query.shape[-1] ** -0.5
    return s * (query @ key.transpose(-2, -1))  # (B, H, Lq, Lk)


def softmax_attention_reference(
    logits: Tensor, value: Tensor | None, masks: Masks, extra_allowed: Tensor | None = None
) -> tuple[Tensor | None, Tensor]:
    """Float64 masked softmax attention from precomputed logits.

    Args:
        logits: (B, H, Lq, Lk) raw scores (already scaled).
        value: (B, H, Lk, Ev) or None (weights only).
        masks: the validated masks of the call; a float mask is added to the logits.
        extra_allowed: a variant's own pattern (e.g. a band), bool broadcastable to the logits.

    Returns:
        (output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)), both float64.
    """
    scores = logits.double()  # (B, H, Lq, Lk)
    if masks.float_mask is not None:
        scores = scores + masks.float_mask.double()
    allowed = masks.allowed(scores.device)  # (B|1, H|1, Lq, Lk) or None
    if extra_allowed is not None:
        allowed = extra_allowed if allowed is None else allowed & extra_allowed
    weights = masked_softmax(scores, allowed)  # (B, H, Lq, Lk)
    out = None if value is None else weights @ value.double()  # (B, H, Lq, Ev)
    return out, weights
