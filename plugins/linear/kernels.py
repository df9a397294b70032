"""Fast paths of linear attention on precomputed features (all O(L * F * Ev) time).

Given features ``phi_q`` (B, H, Lq, F), ``phi_k`` (B, H, Lk, F) (0 on masked keys) and values:

    out_i = phi_q_i . S_i / max(phi_q_i . z_i, thr)      S_i = sum_j phi_k_j v_j^T,  z_i = sum_j phi_k_j

with the sums over every key (non-causal) or keys j <= i (causal). The normaliser rides along as
an extra all-ones value column, so numerator and denominator come out of the same matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import causal_mask

__all__ = ["linear_noncausal", "linear_causal", "linear_weights"]


def _normalise(num_den: Tensor, thr: float | Tensor) -> Tensor:
    """Split (..., Ev + 1) into numerator and normaliser; ``num / max(den, thr)``."""
    num, den = num_den[..., :-1], num_den[..., -1:]  # (..., Ev), (..., 1)
    if isinstance(thr, Tensor):
        return num / torch.maximum(den, thr)
    return num / den.clamp_min(thr)


def _with_ones(value: Tensor) -> Tensor:
    return F.pad(value, (0, 1), value=1.0)  # (B, H, Lk, Ev + 1): last column yields the normaliser


def linear_noncausal(phi_q: Tensor, phi_k: Tensor, value: Tensor, thr: float | Tensor) -> Tensor:
    """Every query sees every (unmasked) key: two matmuls, (B, H, Lq, Ev)."""
    state = phi_k.transpose(-2, -1) @ _with_ones(value)  # (B, H, F, Ev + 1)
    return _normalise(phi_q @ state, thr)  # (B, H, Lq, Ev)


def linear_causal(
    phi_q: Tensor, phi_k: Tensor, value: Tensor, thr: float | Tensor, chunk_size: int
) -> Tensor:
    """Causal (upper-left aligned, SDPA semantics) linear attention, chunked.

    Within a chunk of C positions: the masked quadratic form tril(phi_q phi_k^T) V (matmuls of
    size C); across chunks: the exclusive prefix sum of the chunk states phi_k^T V. Time
    O(L * (C + F) * Ev), memory O(L * (C + F * Ev / C)).
    """
    lq, lk = phi_q.shape[-2], phi_k.shape[-2]
    n = min(lq, lk)
    thr_head = thr[..., :n, :] if isinstance(thr, Tensor) else thr
    out = _causal_square(phi_q[..., :n, :], phi_k[..., :n, :], value[..., :n, :], thr_head, chunk_size)
    if lq <= lk:
        return out  # keys beyond Lq are in every query's future
    # Queries i >= Lk see every key (j <= i always holds).
    thr_tail = thr[..., n:, :] if isinstance(thr, Tensor) else thr
    tail = linear_noncausal(phi_q[..., n:, :], phi_k, value, thr_tail)  # (B, H, Lq - Lk, Ev)
    return torch.cat([out, tail], dim=-2)  # (B, H, Lq, Ev)


def _causal_square(
    phi_q: Tensor, phi_k: Tensor, value: Tensor, thr: float | Tensor, chunk_size: int
) -> Tensor:
    b, h, length, feat = phi_q.shape
    ev = value.shape[-1]
    c = min(chunk_size, length)
    pad = (-length) % c
    v1 = _with_ones(value)  # (B, H, L, Ev + 1)
    if pad:  # padded keys have features 0 (no contribution); padded query rows are dropped
        phi_q, phi_k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v1))
    n = (length + pad) // c
    q = phi_q.reshape(b, h, n, c, feat)  # (B, H, N, C, F)
    k = phi_k.reshape(b, h, n, c, feat)  # (B, H, N, C, F)
    v = v1.reshape(b, h, n, c, ev + 1)  # (B, H, N, C, Ev + 1)
    states = k.transpose(-2, -1) @ v  # (B, H, N, F, Ev + 1): each chunk's sum phi_k v^T
    prefix = states.cumsum(dim=2)  # (B, H, N, F, Ev + 1), inclusive
    prefix = F.pad(prefix[:, :, :-1], (0, 0, 0, 0, 1, 0))  # (B, H, N, F, Ev + 1), exclusive
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # (C, C)
    scores = (q @ k.transpose(-2, -1)).masked_fill(~tril, 0.0)  # (B, H, N, C, C)
    num_den = q @ prefix + scores @ v  # (B, H, N, C, Ev + 1)
    num_den = num_den.reshape(b, h, n * c, ev + 1)[:, :, :length]  # (B, H, L, Ev + 1)
    return _normalise(num_den, thr)  # (B, H, L, Ev)


def linear_weights(
    phi_q: Tensor, phi_k: Tensor, thr: float | Tensor, is_causal: bool
) -> Tensor:
    """The dense normalised weights (B, H, Lq, Lk) of the same computation (O(Lq * Lk))."""
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Lq, Lk), 0 on masked keys
    if is_causal:
        allowed = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)  # (Lq, Lk)
        scores = scores.masked_fill(~allowed, 0.0)
    den = scores.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    if isinstance(thr, Tensor):
        return scores / torch.maximum(den, thr)
    return scores / den.clamp_min(thr)
