"""Fast paths of linear attention on precomputed features (all O(L * F * Ev) time).

Given features ``phi_q`` (B, H, Lq, F), ``phi_k`` (B, H, Lk, F) (0 on masked keys) and values:

    out_i = phi_q_i . S_i / max(phi_q_i . z_i, thr)      S_i = sum_j phi_k_j v_j^T,  z_i = sum_j phi_k_j

with the sums over every key (non-causal) or keys j <= i (causal). The normaliser rides along as
an extra all-ones value column, so numerator and denominator come out of the same matmuls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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
    n = (length + pad) // c
    if pad:  # padded keys have features 0 (no contribution); padded query rows are dropped
        phi_q, phi_k, value = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, value))
        if isinstance(thr, Tensor):
            thr = F.pad(thr, (0, 0, 0, pad), value=1.0)
    if isinstance(thr, Tensor):
        thr = thr.expand(b, h, length + pad, 1).reshape(b * h, n, c, 1)  # (G, N, C, 1)
    out = _CausalChunked.apply(
        phi_q.reshape(b * h, n, c, feat), phi_k.reshape(b * h, n, c, feat),
        value.reshape(b * h, n, c, ev), thr,
    )  # (G, N, C, Ev)
    return out.reshape(b, h, n * c, ev)[:, :, :length]  # (B, H, L, Ev)


class _CausalChunked(torch.autograd.Function):
    """Normalised causal linear attention on chunked features, with a hand-written backward.

    Autograd of the same ops is correct too, but spends over half its time in zero-fills, slices
    and copies; this fuses them (same 12 batched matmuls in total, forward and backward).
    Inputs: q, k (G, N, C, F), v (G, N, C, Ev), thr float or (G, N, C, 1) (no gradient).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, thr: float | Tensor) -> Tensor:
        g, n, c, f = q.shape
        ev = v.shape[-1]
        q3, k3 = q.reshape(g * n, c, f), k.reshape(g * n, c, f)  # (GN, C, F)
        v3 = F.pad(v.reshape(g * n, c, ev), (0, 1), value=1.0)  # (GN, C, Ev + 1): ones -> normaliser
        states = torch.bmm(k3.mT, v3).view(g, n, f, ev + 1)  # each chunk's sum phi_k v^T
        prefix = torch.zeros_like(states)  # (G, N, F, Ev + 1): exclusive prefix over chunks
        torch.cumsum(states[:, :-1], dim=1, out=prefix[:, 1:])
        p3 = prefix.view(g * n, f, ev + 1)
        scores = torch.bmm(q3, k3.mT).tril_()  # (GN, C, C): intra-chunk, causal
        num_den = torch.bmm(scores, v3).baddbmm_(q3, p3)  # (GN, C, Ev + 1); in place: no copy
        den = num_den[..., ev:]  # (GN, C, 1)
        thr3 = thr.reshape(g * n, c, 1) if isinstance(thr, Tensor) else thr
        live = den >= thr3  # (GN, C, 1): where the normaliser (not eps) is the divisor
        div = torch.where(live, den, thr3 if isinstance(thr3, Tensor) else torch.full_like(den, thr3))
        out = num_den[..., :ev] / div  # (GN, C, Ev)
        ctx.save_for_backward(q3, k3, v3, scores, p3, out, div, live)
        ctx.dims = (g, n, c, f, ev)
        return out.view(g, n, c, ev)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q3, k3, v3, scores, p3, out, div, live = ctx.saved_tensors
        g, n, c, f, ev = ctx.dims
        g_out = grad.reshape(g * n, c, ev)  # (GN, C, Ev)
        g_nd = torch.empty_like(v3)  # (GN, C, Ev + 1): gradient of [num, den]
        torch.div(g_out, div, out=g_nd[..., :ev])
        g_den = -(g_nd[..., :ev] * out).sum(dim=-1, keepdim=True)  # (GN, C, 1)
        g_nd[..., ev:] = g_den.masked_fill_(~live, 0.0)
        d_scores = torch.bmm(g_nd, v3.mT).tril_()  # (GN, C, C)
        dq = torch.bmm(d_scores, k3).baddbmm_(g_nd, p3.mT)  # (GN, C, F)
        d_prefix = torch.bmm(q3.mT, g_nd).view(g, n, f, ev + 1)
        # states of chunk i feed the prefix of every later chunk: suffix sums, exclusive.
        d_states = torch.zeros_like(d_prefix)  # (G, N, F, Ev + 1)
        torch.cumsum(d_prefix[:, 1:].flip(1), dim=1, out=d_states[:, :-1])
        d_states[:, :-1] = d_states[:, :-1].flip(1)
        ds3 = d_states.view(g * n, f, ev + 1)
        dk = torch.bmm(d_scores.mT, q3).baddbmm_(v3, ds3.mT)  # (GN, C, F)
        dv = None
        if ctx.needs_input_grad[2]:
            dv = torch.bmm(scores.mT, g_nd).baddbmm_(k3, ds3)[..., :ev]  # (GN, C, Ev)
            dv = dv.reshape(g, n, c, ev)
        return dq.view(g, n, c, f), dk.view(g, n, c, f), dv, None


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
