"""Textbook local (sliding-window) attention, float64 (Beltagy et al. 2020, 'Longformer', sec. 3.1).

Query i sits at key position p_i = i + q_offset (q_offset = Lk - Lq under lower-right causal
alignment, the decoding case; 0 otherwise):

    allowed_ij = |p_i - j| <= window  (and j <= p_i when causal, and key_mask / attn_mask)
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
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)) in float64, dense on purpose."""
    logits = dot_product_logits(query.double(), key.double(), scale)  # (B, H, Lq, Lk)
    p = torch.arange(query.shape[2], device=query.device) + masks.q_offset  # (Lq,) key position of query i
    j = torch.arange(key.shape[2], device=key.device)  # (Lk,)
    band = (p[:, None] - j[None, :]).abs() <= window  # (Lq, Lk): |p_i - j| <= window
    return softmax_attention_reference(logits, value, masks, extra_allowed=band)  # causal is in masks
