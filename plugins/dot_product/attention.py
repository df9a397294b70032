"""Dot-product attention on ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from attnreg.core import (
    Attention,
    AttentionConfig,
    Capabilities,
    Masks,
    accum_dtype,
    dot_product_logits,
    hits_under,
    masked_sdpa,
    masked_softmax,
    poison_rows,
    repeat_kv,
    screen,
)
from attnreg.core.parallel import ShardContext

from .distributed import ring_attention


class DotProductConfig(AttentionConfig):
    """Config of ``dot_product``: only the shared fields."""

    variant: Literal["dot_product"]


class DotProductAttention(Attention):
    """softmax(scale * Q K^T + mask) V through PyTorch's fused SDPA kernels."""

    config_class = DotProductConfig
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
        dropout=True, normalized=True, permutation_invariant=True, learnable=False,
        decoding=True, grouped_query=True, context_parallel=True, complexity="O(Lq*Lk*E)",
    )

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        scale = self.softmax_scale(query.shape[-1])
        # The last query of a lower-right causal call sees every key: one query is not causal at all.
        causal = masks.is_causal and masks.q_offset < masks.k_len - 1
        # A key hidden from some query: NaN/inf there must not leak (bad: (B, Hkv, Lk) or None).
        key, value, bad = screen(key, value, masks)
        if masks.attn_mask is None and masks.key_mask is None and (not causal or masks.q_offset == 0):
            # No row can be empty (upper-left causal keeps key 0): SDPA's own causal kernel.
            out = masked_sdpa(query, key, value, dropout_p=self.active_dropout, scale=scale, is_causal=causal)
        else:  # rows with nothing to attend come back as 0 (and so do their gradients)
            out = masked_sdpa(query, key, value, masks.allowed(), masks.float_mask,
                              dropout_p=self.active_dropout, scale=scale)  # (B, H, Lq, Ev)
        return poison_rows(out, hits_under(bad, masks))  # rows that see a NaN/inf input: NaN

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: ShardContext) -> Tensor:
        # Ring attention (distributed.py): key/value shards travel around the process group.
        return ring_attention(query, key, value, masks, ctx, self.softmax_scale(query.shape[-1]),
                              accum_dtype(query))

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        acc = accum_dtype(query)
        key = repeat_kv(key, query.shape[1])  # (B, H, Lk, E): the oracle may copy
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        return masked_softmax(logits, masks.allowed(query.device)).to(query.dtype)
