"""PyTorch's fused attention under any mask, with empty rows at exactly 0.

Every variant that ends in ``F.scaled_dot_product_attention`` (dot_product, local's blocks,
sparse's gathered blocks) calls it through ``masked_sdpa``: the mask is made safe for rows
that have nothing to attend (``sdpa_safe_mask``) and those rows are zeroed after the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import repeat_kv
from .masks import sdpa_safe_mask

__all__ = ["masked_sdpa"]

# enable_gqa (torch >= 2.5) lets SDPA read grouped key/value heads without a per-head copy.
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def masked_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` where ``allowed`` masks and ``bias`` shifts the logits.

    Rows with nothing allowed give 0 (and so do their gradients), whatever SDPA's kernel would
    have returned for them. Key/value may have fewer heads than the query (grouped-query
    attention), read without a copy per query head where torch >= 2.5.

    Args:
        query: (B, H, Lq, E).
        key: (B, Hkv, Lk, E), H a multiple of Hkv.
        value: (B, Hkv, Lk, Ev).
        allowed: bool broadcastable to (B, H, Lq, Lk), True = may attend; None = no mask.
        bias: additive float mask broadcastable to the same shape (``-inf`` masks), or None.
        dropout_p: dropout probability, as in SDPA.
        scale: logit scale, as in SDPA (None: 1 / sqrt(E)).
        is_causal: SDPA's own (upper-left) causal mask; only without ``allowed`` and ``bias``.

    Returns:
        (B, H, Lq, Ev).
    """
    if is_causal and (allowed is not None or bias is not None):
        raise ValueError("masked_sdpa: is_causal=True takes no allowed/bias mask (AND the causal "
                         "mask into allowed instead)")
    kw = {}
    if key.shape[1] != query.shape[1]:
        if _HAS_GQA:
            kw["enable_gqa"] = True
        else:  # older torch: the copy GQA exists to avoid, but the same result
            key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    mask, dead = sdpa_safe_mask(allowed, bias, query.dtype)  # empty rows opened; zeroed below
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **kw)  # (B, H, Lq, Ev)
    return out.masked_fill(dead, 0.0) if dead is not None else out
