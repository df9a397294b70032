"""Textbook local (sliding-window) attention, float64 (Beltagy et al. 2020, 'Longformer', sec. 3.1).

    allowed_ij = |i - j| <= window  (and j <= i when causal, and key_mask / attn_mask)
    weights    = softmax(scale * Q K^T + float_mask, over allowed j)   (empty rows -> 0)
    out        = weights @ V
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnreg.core import Masks, dot_product_logits, softmax_attention_reference


def local_reference(
    query: Tensor, key: Tensor, value: Tensor | None, masks: Masks, window: int,
    scale: float | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, L, Ev) or None, weights (B, H, L, L)) in float64, dense on purpose."""
    logits = dot_product_logits(query.double(), key.double(), scale)  # (B, H, L, L)
    i = torch.arange(query.shape[2], device=query.device)  # (L,)
    band = (i[:, None] - i[None, :]).abs() <= window  # (L, L): |i - j| <= window
    return softmax_attention_reference(logits, value, masks, extra_allowed=band)  # causal is in masks
