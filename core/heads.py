"""Grouped-query key/value heads: the copy that grouped-query attention exists to avoid, for
oracles, fallbacks and variants that read one key/value head per query head."""

from __future__ import annotations

from torch import Tensor

__all__ = ["repeat_kv"]


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, heads, L, D): key/value head j serves query heads j*G .. j*G + G - 1
    (G = heads / Hkv, ``repeat_interleave``, the layout of SDPA's ``enable_gqa``). Returns ``t``
    itself when it already has ``heads`` heads."""
    hkv = t.shape[1]
    if hkv == heads:
        return t
    if hkv < 1 or heads % hkv:
        raise ValueError(f"repeat_kv: {heads} query heads are not a multiple of {hkv} key/value heads")
    return t.repeat_interleave(heads // hkv, dim=1)  # (B, heads, L, D)
