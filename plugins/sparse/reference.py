"""Textbook block-sparse attention, float64: dense softmax attention with the layout's mask.

    P       = pattern_mask(L)                        # (H, L, L): token i may see token j
    weights = softmax(scale * Q K^T + float_mask, masked where not (P and masks))
    out     = weights @ V

The layouts themselves (Zaheer et al. 2020; Child et al. 2019) are defined in ``layouts.py``;
``pattern_mask`` expands a block layout (H, nb, nb) to tokens by repeating every entry over
``block_size x block_size`` tokens and cropping to L. When the queries are the last Lq positions
of the sequence (``causal_alignment="lower_right"``, decoding), their pattern is the last Lq rows
of ``pattern_mask(Lk)``: the layout of the whole sequence, not of the queries alone.
"""

from __future__ import annotations

from torch import Tensor

from attnreg.core import Masks, dot_product_logits, softmax_attention_reference


def sparse_reference(
    query: Tensor, key: Tensor, value: Tensor | None, masks: Masks, pattern: Tensor,
    scale: float | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)) in float64 for ``pattern (H|1, Lq, Lk)``."""
    logits = dot_product_logits(query.double(), key.double(), scale)  # (B, H, Lq, Lk)
    allowed = pattern.to(logits.device)[None]  # (1, H|1, Lq, Lk)
    return softmax_attention_reference(logits, value, masks, extra_allowed=allowed)
