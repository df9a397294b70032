"""Sigmoid attention: config and module."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from attnreg.core import (
    Attention,
    AttentionConfig,
    Capabilities,
    DecodeState,
    KVCacheState,
    Masks,
    dot_product_logits,
    hits_under,
    poison_rows,
    screen,
)


class SigmoidConfig(AttentionConfig):
    """Config of ``sigmoid``: the shared fields and the logit bias ``b``."""

    variant: Literal["sigmoid"] = Field("sigmoid", description="Variant name.")
    bias: float | None = Field(
        None, description="Logit bias b added before the sigmoid; None means -log(Lk), the paper's "
        "choice, which keeps the initial sum of a row of weights near 1.",
    )


class SigmoidAttention(Attention):
    """w_ij = sigmoid(scale * q_i . k_j + b) where allowed, else 0; out = w @ V.

    Rows are NOT normalised (``normalized=False``): each weight is independent of the others in
    its row. Attention dropout is not implemented (``dropout=False``: a config with dropout > 0 is
    refused with ``UnsupportedFeatureError`` instead of being silently ignored).

    Decoding (``decoding=True``) uses attnreg's KV cache: ``masks.allowed()`` honours the
    lower-right causal offset. The default bias ``-log(Lk)`` depends on the length of the whole
    sequence, which a cache only knows from ``init_state(..., max_length=L)``: decoding then
    equals the causal forward over those L positions.
    """

    variant = "sigmoid"
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
        dropout=False, normalized=False, permutation_invariant=True, learnable=False, decoding=True,
        complexity="O(Lq*Lk*E)",
    )

    def __init__(self, config: SigmoidConfig) -> None:
        super().__init__(config)
        self.bias = config.bias

    def _weights_acc(self, query: Tensor, key: Tensor, masks: Masks, length: int | None = None) -> Tensor:
        """Weights (B, H, Lq, Lk) in the accumulation dtype (float32 for half inputs); ``length``
        is the sequence length of the default bias (Lk unless decoding)."""
        acc = self._accum_dtype(query)
        b = self.bias if self.bias is not None else -math.log(length or key.shape[2])
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale) + b  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)  # -inf -> sigmoid 0, gradient 0
        w = torch.sigmoid(logits)
        allowed = masks.allowed(query.device)  # (B|1, H|1, Lq, Lk) or None
        # masked_fill (not multiply): masked entries are exactly 0 and get no gradient.
        return w if allowed is None else w.masked_fill(~allowed, 0.0)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        return self._weights_acc(query, key, masks).to(query.dtype)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                length: int | None = None) -> Tensor:
        # A weight of 0 times a NaN value is NaN: keys/values a query cannot see are screened
        # (non-finite entries -> 0), and the rows that do see a non-finite one are made NaN.
        key, value, bad = screen(key, value, masks)  # bad (B, H, Lk) or None
        w = self._weights_acc(query, key, masks, length)  # (B, H, Lq, Lk)
        out = (w @ value.to(w.dtype)).to(query.dtype)  # (B, H, Lq, Ev)
        return poison_rows(out, hits_under(bad, masks))

    def _state_fingerprint(self) -> dict[str, Any]:
        # The bias decides whether the state needed max_length (the default bias reads it).
        return {"bias": self.bias}

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int, dtype: torch.dtype,
                    device: torch.device, max_length: int | None) -> DecodeState:
        if self.bias is None and max_length is None:
            raise ValueError("init_state: sigmoid's default bias -log(L) needs the total length L: pass "
                             "max_length=L (or build with an explicit bias)")
        return super()._init_state(batch, heads, head_dim, value_dim, dtype, device, max_length)

    def _attend_cached(self, query: Tensor, state: KVCacheState, masks: Masks) -> Tensor:
        # The default bias -log(L) uses the total length the state was made for, not the keys so far.
        assert state.key is not None and state.value is not None
        return self._attend(query, state.key, state.value, masks, length=state.max_length)  # (B, H, T, Ev)

