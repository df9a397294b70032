"""Query-chunked additive attention with per-chunk activation checkpointing.

The naive formula materialises ``tanh(Q W_q + K W_k + b)`` as a (B, H, Lq, Lk, d_a) tensor (8 GB
at L=2048, d_a=64, H=8 in fp32). Here the projections are computed once, and the queries are
processed ``chunk`` rows at a time: only one (B, H, chunk, Lk, d_a) tensor lives at a time in
forward, and each chunk's backward recomputes it (activation checkpointing, with a hand-written
in-place backward), so backward is bounded by the same O(chunk * Lk * d_a) per batch and head.
Causal chunks only look at the keys they can see (j < end of the chunk): half the work."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
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


class _ChunkAttention(torch.autograd.Function):
    """One query chunk of additive attention whose backward RECOMPUTES the chunk (checkpointing
    by hand): forward saves only the small inputs, never the (B, H, c, Lk, d_a) tanh tensor.

    Written as a Function rather than ``torch.utils.checkpoint`` around autograd ops because the
    hand-written backward needs ONE (B, H, c, Lk, d_a) buffer (updated in place) where autograd's
    needs three, and runs one tanh per element instead of two (measured in docs/variants/additive.md).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor,
        bias: Tensor | None, allowed: Tensor | None, scale: float, dropout_p: float,
    ) -> Tensor:
        p = masked_softmax(_biased(chunk_scores(qp, kp, w_v, scale), bias), allowed)  # (B, H, c, Lk)
        keep = None
        if dropout_p > 0:
            keep = torch.empty_like(p, dtype=torch.bool).bernoulli_(1.0 - dropout_p)  # (B, H, c, Lk)
            p = p * keep / (1.0 - dropout_p)
        ctx.save_for_backward(qp, kp, w_v, value, bias, allowed, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return p @ value  # (B, H, c, Ev)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: Tensor) -> tuple[Tensor | None, ...]:
        qp, kp, w_v, value, bias, allowed, keep = ctx.saved_tensors
        b, h, c, d_a = qp.shape
        lk = kp.shape[2]
        t = torch.tanh_(qp.unsqueeze(3) + kp.unsqueeze(2))  # (B, H, c, Lk, d_a): recomputed
        s = (t.view(b, h, c * lk, d_a) @ w_v.unsqueeze(-1)).view(b, h, c, lk)  # (B, H, c, Lk)
        p = masked_softmax(_biased(s * ctx.scale, bias), allowed)  # (B, H, c, Lk)
        p_used = p if keep is None else p * keep / (1.0 - ctx.dropout_p)  # weights applied to V
        d_value = p_used.transpose(-2, -1) @ d_out  # (B, H, Lk, Ev)
        d_p = d_out @ value.transpose(-2, -1)  # (B, H, c, Lk)
        if keep is not None:
            d_p = d_p * keep / (1.0 - ctx.dropout_p)
        # Softmax backward; masked entries have p = 0, so they get no gradient (empty rows: 0).
        d_s = p * (d_p - (p * d_p).sum(-1, keepdim=True))  # (B, H, c, Lk)
        d_bias = d_s.sum_to_size(bias.shape) if bias is not None and ctx.needs_input_grad[4] else None
        g = d_s * ctx.scale  # (B, H, c, Lk): d loss / d (v_h . tanh(...))
        d_w_v = (g.view(b, h, 1, c * lk) @ t.view(b, h, c * lk, d_a)).sum(0).view(h, d_a)  # (H, d_a)
        # d pre-activation = g * v_h * (1 - t^2); the sums over keys/queries give d qp / d kp.
        # (1 - t^2) is split as g - g*t^2 so that t is reused in place: no second big buffer.
        t.square_().mul_(g.unsqueeze(-1))  # (B, H, c, Lk, d_a): g * t^2
        v_b = w_v[None, :, None, :]  # (1, H, 1, d_a)
        d_qp = (g.sum(-1, keepdim=True) - t.sum(3)) * v_b  # (B, H, c, d_a)
        d_kp = (g.sum(-2).unsqueeze(-1) - t.sum(2)) * v_b  # (B, H, Lk, d_a)
        return d_qp, d_kp, d_w_v, d_value, d_bias, None, None, None


def _biased(s: Tensor, bias: Tensor | None) -> Tensor:
    return s if bias is None else s + bias


def chunked_attention(
    qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor, masks: Masks, scale: float,
    dropout_p: float, chunk: int,
) -> Tensor:
    """Additive attention output (B, H, Lq, Ev), ``chunk`` query rows at a time.

    Args:
        qp: (B, H, Lq, d_a) = Q W_q + b;  kp: (B, H, Lk, d_a) = K W_k;  w_v: (H, d_a);
        value: (B, H, Lk, Ev), all in the compute dtype.
    Every chunk recomputes its pairwise tensor in backward (see ``_ChunkAttention``), so
    forward and backward peak at one (B, H, chunk, Lk, d_a) tensor. Dropout keep-masks are
    saved (bool, (B, H, chunk, Lk) per chunk) so that backward uses exactly the forward's masks.
    """
    outs = []
    for i, qp_c in enumerate(qp.split(chunk, dim=2)):  # split: one cat in backward, not n scatters
        start = i * chunk
        stop = start + qp_c.shape[2]
        k_stop = _key_stop(masks, stop)
        kp_c = kp if k_stop == masks.k_len else kp[:, :, :k_stop]  # (B, H, k_stop, d_a)
        v_c = value if k_stop == masks.k_len else value[:, :, :k_stop]  # (B, H, k_stop, Ev)
        allowed = chunk_allowed(masks, start, stop, k_stop, qp.device)
        bias = chunk_bias(masks, start, stop, k_stop)
        if bias is not None:
            bias = bias.to(qp.dtype)
        outs.append(_ChunkAttention.apply(qp_c, kp_c, w_v, v_c, bias, allowed, scale, dropout_p))
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

