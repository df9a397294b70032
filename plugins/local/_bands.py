"""Band masks of the sliding window: which keys each query may see, as bool or SDPA bias."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["band_mask", "block_band", "make_rect_band", "rect_band"]


def band_mask(length: int, window: int, is_causal: bool = False,
              device: torch.device | str | None = None) -> Tensor:
    """Dense ``(L, L)`` bool band: True where ``|i - j| <= window`` (and ``j <= i`` when causal).

    Built in place in one bool tensor: an int64 ``i - j`` matrix would take 8x its memory (16 GiB
    at L = 32768, for the benchmark's dense baseline).
    """
    band = torch.ones(length, length, dtype=torch.bool, device=device)  # (L, L)
    return band.triu_(-window).tril_(0 if is_causal else window)


def rect_band(q_len: int, k_len: int, offset: int, window: int, is_causal: bool,
              device: torch.device | str | None = None) -> Tensor:
    """Band ``(Lq, Lk)`` bool of queries at key positions ``i + offset``: True where
    ``|i + offset - j| <= window`` (and ``j <= i + offset`` when causal). ``offset=0``, Lq = Lk is
    ``band_mask``; ``offset = Lk - Lq`` is the lower-right (decoding) alignment."""
    return make_rect_band(q_len, k_len, offset, window, is_causal, torch.bool, device)


def block_band(block: int, window: int, is_causal: bool,
               device: torch.device | str | None = None) -> Tensor:
    """The band in block coordinates, ``(block, span)``, shared by every block.

    Row r is query ``b*block + r``; column c is key ``b*block - window + c``; so ``|i - j| <= w``
    becomes ``r <= c <= r + 2w`` and causal ``j <= i`` becomes ``c <= r + w``.
    """
    span = block + window * (1 if is_causal else 2)
    r = torch.arange(block, device=device)[:, None]  # (block, 1)
    c = torch.arange(span, device=device)[None, :]  # (1, span)
    return (c >= r) & (c <= r + (window if is_causal else 2 * window))  # (block, span)


def make_rect_band(rows: int, cols: int, offset: int, window: int, is_causal: bool,
                    dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    i = torch.arange(rows, device=device)[:, None] + offset  # (rows, 1)
    j = torch.arange(cols, device=device)[None, :]  # (1, cols)
    allowed = (i - j).abs() <= window  # (rows, cols)
    if is_causal:
        allowed = allowed & (j <= i)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
