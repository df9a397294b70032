"""Textbook scaled dot-product attention (Vaswani et al. 2017), float64.

    weights = softmax(scale * Q K^T + float_mask, masked where not allowed)
    out     = weights @ V
"""

from __future__ import annotations

from torch import Tensor

from attnreg.core import Masks, dot_product_logits, softmax_attention_reference


def dot_product_reference(
    query: Tensor, key: Tensor, value: Tensor | None, masks: Masks, scale: float | None = None
) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)) in float64."""
    logits = dot_product_logits(query.double(), key.double(), scale)  # (B, H, Lq, Lk)
    return softmax_attention_reference(logits, value, masks)
