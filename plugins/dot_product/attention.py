"""Dot-product attention on ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from attnreg.core import (
    Attention,
    AttentionConfig,
    Capabilities,
    Masks,
    dot_product_logits,
    masked_softmax,
    sdpa_safe_mask,
)


class DotProductConfig(AttentionConfig):
    """Config of ``dot_product``: only the shared fields."""

    variant: Literal["dot_product"] = Field("dot_product", description="Variant name.")


class DotProductAttention(Attention):
    """softmax(scale * Q K^T + mask) V through PyTorch's fused SDPA kernels."""

    variant = "dot_product"
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
        dropout=True, normalized=True, permutation_invariant=True, learnable=False,
        complexity="O(Lq*Lk*E)",
    )

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        scale = self.softmax_scale(query.shape[-1])
        if masks.attn_mask is None and masks.key_mask is None:
            # No row can be empty (upper-left causal keeps key 0): SDPA's own causal kernel.
            return F.scaled_dot_product_attention(
                query, key, value, dropout_p=self.active_dropout,
                is_causal=masks.is_causal, scale=scale,
            )
        mask, dead = _sdpa_mask(masks, query.dtype)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.active_dropout, scale=scale
        )  # (B, H, Lq, Ev)
        # Rows with nothing to attend were given a harmless mask; zero them (and their grads).
        return out.masked_fill(dead, 0.0) if dead is not None else out

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        acc = self._accum_dtype(query)
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        return masked_softmax(logits, masks.allowed(query.device)).to(query.dtype)


def _sdpa_mask(masks: Masks, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """One SDPA mask for all masks, and the (B|1, H|1, Lq, 1) rows that have nothing to attend."""
    mask, dead = sdpa_safe_mask(masks.allowed(), masks.float_mask, dtype)
    assert mask is not None  # called only when some mask is in force
    return mask, dead
