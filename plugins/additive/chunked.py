"""Query-chunked additive attention with per-chunk activation checkpointing.

The naive formula materialises ``tanh(Q W_q + K W_k + b)`` as a (B, H, Lq, Lk, d_a) tensor (8 GB
at L=2048, d_a=64, H=8 in fp32). Here the projections are computed once, and the queries are
processed ``chunk`` rows at a time: only one (B, H, chunk, Lk, d_a) tensor lives at a time in
forward, and ``torch.utils.checkpoint`` recomputes it chunk by chunk in backward, so backward is
bounded by the same O(chunk * Lk * d_a) (per batch and head) instead of storing every chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnreg.core import Masks, masked_softmax

__all__ = ["chunk_allowed", "chunk_bias", "chunk_scores", "chunked_attention", "chunked_scores"]


def chunk_scores(qp: Tensor, kp: Tensor, w_v: Tensor, scale: float) -> Tensor:
    """Additive scores ``scale * v_h . tanh(qp_i + kp_j)`` of one query chunk.

    Args:
        qp: (B, H, c, d_a) projected queries of the chunk, bias already added.
        kp: (B, H, Lk, d_a) projected keys.
        w_v: (H, d_a) the per-head score vectors v_h.
    Returns:
        (B, H, c, Lk) scores.
    """
    b, h, c, d_a = qp.shape
    lk = kp.shape[2]
    t = qp.unsqueeze(3) + kp.unsqueeze(2)  # (B, H, c, Lk, d_a): the one big tensor
    t = t.tanh_()  # in place: the add does not need its output for backward, tanh saves its own
    # Contract d_a as one matmul per (B, H): (B, H, c*Lk, d_a) @ (H, d_a, 1).
    s = t.view(b, h, c * lk, d_a) @ w_v.unsqueeze(-1)  # (B, H, c*Lk, 1)
    s = s.view(b, h, c, lk)  # (B, H, c, Lk)
    return s * scale if scale != 1.0 else s


def chunk_allowed(masks: Masks, start: int, stop: int, k_stop: int, device: torch.device) -> Tensor | None:
    """Bool allowed mask (B|1, H|1, c|1, k_stop) for query rows [start, stop) and keys [0, k_stop).

    Built per chunk so that no dense (Lq, Lk) mask is ever materialised. A float attn_mask is
    not included: its -inf entries are added to the scores instead (see ``chunk_bias``).
    """
    out: Tensor | None = None
    m = masks.attn_mask
    if m is not None and m.dtype == torch.bool:
        out = _slice_mask(m, start, stop, k_stop)  # (B|1, H|1, c|1, k_stop|1)
    if masks.key_mask is not None:
        km = masks.key_mask[:, None, None, :k_stop]  # (B, 1, 1, k_stop)
        out = km if out is None else out & km
    if masks.is_causal:
        rows = torch.arange(start, stop, device=device)[:, None]  # (c, 1)
        cols = torch.arange(k_stop, device=device)[None, :]  # (1, k_stop)
        cm = (cols <= rows)[None, None]  # (1, 1, c, k_stop)
        out = cm if out is None else out & cm
    return out


def chunk_bias(masks: Masks, start: int, stop: int, k_stop: int) -> Tensor | None:
    """The float attn_mask (B|1, H|1, c|1, k_stop|1) of the chunk, or None."""
    m = masks.float_mask
    return None if m is None else _slice_mask(m, start, stop, k_stop)


def _slice_mask(m: Tensor, start: int, stop: int, k_stop: int) -> Tensor:
    """Rows [start, stop) and keys [0, k_stop) of a 4-D mask whose broadcast dims have size 1."""
    if m.shape[2] != 1:
        m = m[:, :, start:stop]
    if m.shape[3] != 1:
        m = m[:, :, :, :k_stop]
    return m


def _key_stop(masks: Masks, stop: int) -> int:
    """Keys a chunk ending at query ``stop`` can see: causal rows never look past key stop-1."""
    return min(stop, masks.k_len) if masks.is_causal else masks.k_len


def _attend_chunk(
    qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor, allowed: Tensor | None, bias: Tensor | None,
    scale: float, dropout_p: float,
) -> Tensor:
    """Output (B, H, c, Ev) of one query chunk (re-run in backward by the checkpoint)."""
    s = chunk_scores(qp, kp, w_v, scale)  # (B, H, c, Lk)
    if bias is not None:
        s = s + bias
    w = masked_softmax(s, allowed)  # (B, H, c, Lk); empty rows -> 0
    if dropout_p > 0:
        w = F.dropout(w, dropout_p, training=True)
    return w @ value  # (B, H, c, Ev)


def chunked_attention(
    qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor, masks: Masks, scale: float,
    dropout_p: float, chunk: int,
) -> Tensor:
    """Additive attention output (B, H, Lq, Ev), ``chunk`` query rows at a time.

    Args:
        qp: (B, H, Lq, d_a) = Q W_q + b;  kp: (B, H, Lk, d_a) = K W_k;  w_v: (H, d_a);
        value: (B, H, Lk, Ev), all in the compute dtype.
    With autograd on, every chunk is checkpointed (non-reentrant, RNG state preserved so that
    dropout masks are identical on recomputation).
    """
    use_ckpt = torch.is_grad_enabled() and any(
        t.requires_grad for t in (qp, kp, w_v, value)
    )
    outs = []
    for i, qp_c in enumerate(qp.split(chunk, dim=2)):  # split: one cat in backward, not n scatters
        start = i * chunk
        stop = start + qp_c.shape[2]
        k_stop = _key_stop(masks, stop)
        kp_c = kp if k_stop == masks.k_len else kp[:, :, :k_stop]  # (B, H, k_stop, d_a)
        v_c = value if k_stop == masks.k_len else value[:, :, :k_stop]  # (B, H, k_stop, Ev)
        allowed = chunk_allowed(masks, start, stop, k_stop, qp.device)
        bias = chunk_bias(masks, start, stop, k_stop)
        args = (qp_c, kp_c, w_v, v_c, allowed, bias, scale, dropout_p)
        if use_ckpt:
            outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outs.append(_attend_chunk(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, Lq, Ev)


def chunked_scores(qp: Tensor, kp: Tensor, w_v: Tensor, scale: float, chunk: int) -> Tensor:
    """Raw scores (B, H, Lq, Lk) computed chunk by chunk (checkpointed when autograd is on)."""
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (qp, kp, w_v))
    outs = []
    for qp_c in qp.split(chunk, dim=2):
        if use_ckpt:
            outs.append(checkpoint(chunk_scores, qp_c, kp, w_v, scale, use_reentrant=False))
        else:
            outs.append(chunk_scores(qp_c, kp, w_v, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, Lq, Lk)

