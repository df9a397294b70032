"""Local (sliding-window) attention: config and module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from attnreg.core import (
    Attention,
    AttentionConfig,
    Baseline,
    Capabilities,
    CausalAlignment,
    DecodeState,
    Masks,
    accum_dtype,
    check_inputs,
    dot_product_logits,
    masked_softmax,
)
from attnreg.core.parallel import ShardContext

from ._bands import band_mask, rect_band
from ._blocked import MaskCache, local_attention
from .decoding import LocalState
from .distributed import local_sharded

__all__ = ["LocalAttention", "LocalConfig"]


class LocalConfig(AttentionConfig):
    """Config of ``local``: softmax attention restricted to ``|i - j| <= window``."""

    variant: Literal["local"]
    window: int = Field(
        128, ge=0, le=2**31 - 1,
        description="Keys visible on each side of a query: query i sees keys j with |i - j| <= window "
        "(and j <= i when causal). 0 = each token attends only to itself; at most 2**31 - 1 (a "
        "window >= L - 1 is full attention).",
    )
    block_size: int = Field(
        64, ge=1, le=65536,
        description="Query rows per block of the fast path (each block reads block + 2*window keys). "
        "Only speed depends on it; 64 was fastest for window 256 on CPU. Use about the window for "
        "windows much smaller than 64.",
    )


class LocalAttention(Attention):
    """Sliding-window softmax attention in O(L * (block + 2w) * E) time and memory (never L x L).

    Query i attends key j iff ``|i - j| <= window`` (and ``j <= i`` when causal), ANDed with
    ``key_mask`` and ``attn_mask``. Self-attention: Lq == Lk, or Lq < Lk under lower-right causal
    alignment (query i at key position ``i + Lk - Lq``). Decoding keeps only the last ``window``
    keys and values (``LocalState``).
    """

    config_class = LocalConfig
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=False,
        dropout=True, normalized=True, permutation_invariant=False, learnable=False,
        decoding=True, context_parallel=True, complexity="O(L*w*E)",
    )

    def __init__(self, config: LocalConfig) -> None:
        super().__init__(config)
        self.window = config.window
        self.block_size = config.block_size
        # Edge band masks too big for the process-wide cache (wide windows): a few per module,
        # freed with it, never in state_dict. 4 covers both edges for two (dtype, causal) setups.
        self._mask_cache = MaskCache(4, 1 << 22)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        return local_attention(
            query, key, value, masks, self.window, self.block_size,
            self.softmax_scale(query.shape[-1]), self.active_dropout, self._mask_cache,
        )  # (B, H, Lq, Ev)

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: ShardContext) -> Tensor:
        return local_sharded(self, query, key, value, masks, ctx)  # halo exchange (distributed.py)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        acc = accum_dtype(query)
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        allowed = rect_band(masks.q_len, masks.k_len, masks.q_offset, self.window, masks.is_causal,
                            query.device)  # (Lq, Lk)
        extra = masks.allowed(query.device)  # (B|1, H|1, Lq, Lk) or None
        allowed = allowed if extra is None else extra & allowed
        return masked_softmax(logits, allowed).to(query.dtype)

    def _state_fingerprint(self) -> dict[str, Any]:
        return {"window": self.window}  # the state keeps the last `window` positions

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int,
                    dtype: torch.dtype, device: torch.device, max_length: int | None) -> DecodeState:
        return LocalState(
            batch, heads, head_dim, value_dim, dtype, device, max_length=max_length, window=self.window,
            key=torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device),  # (B, H, 0, E)
            value=torch.empty(batch, heads, 0, value_dim, dtype=dtype, device=device),  # (B, H, 0, Ev)
        )

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, DecodeState]:
        if not isinstance(state, LocalState):
            raise ValueError(f"decode: {self.variant} needs the LocalState of its own init_state, got a "
                             f"{type(state).__name__}")
        k_all, v_all, km = state.extend(key, value, key_mask)  # (B, H, m+T, E|Ev), (B, m+T)
        # The T queries are the last T of the m + T positions: lower-right causal, Lk - Lq = m.
        masks = check_inputs(self.variant, self.capabilities, query, k_all, v_all, None, km, True,
                             "lower_right")
        masks = dataclasses.replace(masks, padding_zeroed=True)  # extend zeroed the padding
        out = self._attend(query, k_all, v_all, masks)  # (B, H, T, Ev)
        return out, state.advanced(k_all, v_all, km, key.shape[2])

    def pattern_mask(self, length: int, *, is_causal: bool, num_heads: int) -> Tensor:
        """Dense allowed pattern ``(1, L, L)`` bool (the same in every head): True where
        ``|i - j| <= window`` (and j <= i if causal)."""
        return band_mask(length, self.window, is_causal)[None]  # (1, L, L)

    def flops(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
              *, is_causal: bool, causal_alignment: CausalAlignment = "upper_left") -> float:
        """Useful forward FLOPs: 2*(E + Ev) per (query, allowed key) pair of the band, edges exact.

        ``4 * E * (2w + 1)`` per query and head away from the edges when ``Ev == E``. Lq < Lk is
        lower-right causal (the only Lq != Lk local accepts): query i at key position i + Lk - Lq.
        """
        if q_len != k_len and not (is_causal and causal_alignment == "lower_right" and q_len < k_len):
            raise ValueError(f"{self.variant}: q_len {q_len} != k_len {k_len} needs is_causal, "
                             "causal_alignment='lower_right' and q_len < k_len")
        i = torch.arange(q_len, dtype=torch.float64) + (k_len - q_len)  # key position of query i
        hi = torch.clamp(i + (0 if is_causal else self.window), max=k_len - 1)
        lo = torch.clamp(i - self.window, min=0)
        pairs = float((hi - lo + 1).clamp(min=0).sum())
        return 2.0 * (head_dim + value_dim) * pairs * batch * heads

    def benchmark_baselines(self) -> Mapping[str, Baseline]:
        """``sdpa_dense_band``: torch SDPA with the equivalent dense ``(L, L)`` band mask (O(L^2))."""
        window, scale = self.window, self.scale

        def sdpa_dense_band(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            band = band_mask(query.shape[2], window, is_causal, query.device)  # (L, L)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=band, scale=scale)

        return {"sdpa_dense_band": sdpa_dense_band}

