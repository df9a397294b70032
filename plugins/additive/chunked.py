"""Query-chunked additive attention with per-chunk activation checkpointing.

The naive formula materialises ``tanh(Q W_q + K W_k + b)`` as a (B, H, Lq, Lk, d_a) tensor (8 GB
at L=2048, d_a=64, H=8 in fp32). Here the projections are computed once, and the queries are
processed ``chunk`` rows at a time: only one (B, H, chunk, Lk, d_a) tensor lives at a time in
forward, and each chunk's backward recomputes it (activation checkpointing, with a hand-written
in-place backward), so backward is bounded by the same O(chunk * Lk * d_a) per batch and head.
Double backward (``create_graph=True``) differentiates a plain-torch recomputation of the chunks
instead (``_differentiable_backward``; its graph holds every chunk's tanh tensor).
Causal chunks only look at the keys they can see (j <= last row of the chunk + ``Masks.q_offset``,
the lower-right shift of decoding): half the work."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnreg.core import Masks, masked_softmax, mix_seed

__all__ = ["chunk_allowed", "chunk_scores", "chunked_attention", "chunked_scores"]


def chunk_scores(qp: Tensor, kp: Tensor, w_v: Tensor, scale: float) -> Tensor:
    """Additive scores ``scale * v_h . tanh(qp_i + kp_j)`` of one query chunk.

    Args:
        qp: (B, H, c, d_a) projected queries of the chunk, bias already added.
        kp: (B, H, Lk, d_a) projected keys.
        w_v: (H, d_a) the per-head score vectors v_h.
    Returns:
        (B, H, c, Lk) scores.
    """
    t = qp.unsqueeze(3) + kp.unsqueeze(2)  # (B, H, c, Lk, d_a): the one big tensor
    t = t.tanh_()  # in place: the add does not need its output for backward, tanh saves its own
    s = _contract_v(t, w_v)  # (B, H, c, Lk)
    return s * scale if scale != 1.0 else s


def _contract_v(t: Tensor, w_v: Tensor) -> Tensor:
    """v_h . t[..., :] for t (B, H, c, Lk, d_a): one (1, d_a) @ (d_a, c*Lk) matmul per (B, H).

    Written as a row vector times the transposed view (no copy): measured 3.7x faster on CPU than
    the (c*Lk, d_a) @ (d_a, 1) matrix-vector form, which BLAS runs as a thin GEMM.
    """
    b, h, c, lk, d_a = t.shape
    s = w_v.unsqueeze(-2) @ t.view(b, h, c * lk, d_a).transpose(-2, -1)  # (B, H, 1, c*Lk)
    return s.view(b, h, c, lk)


def chunk_allowed(masks: Masks, start: int, stop: int, k_stop: int, device: torch.device) -> Tensor | None:
    """Bool allowed mask (B|1, H|1, c|1, k_stop) for query rows [start, stop) and keys [0, k_stop).

    Built per chunk so that no dense (Lq, Lk) mask is ever materialised. A float attn_mask is
    not included: it is added to the scores instead, where -inf gives weight 0.
    """
    out: Tensor | None = None
    m = masks.attn_mask
    if m is not None and m.dtype == torch.bool:
        out = _slice_mask(m, start, stop, k_stop)  # (B|1, H|1, c|1, k_stop|1)
    if masks.key_mask is not None:
        km = masks.key_mask[:, None, None, :k_stop]  # (B, 1, 1, k_stop)
        out = km if out is None else out & km
    if masks.is_causal:
        rows = torch.arange(start, stop, device=device)[:, None] + masks.q_offset  # (c, 1): key position
        cols = torch.arange(k_stop, device=device)[None, :]  # (1, k_stop)
        cm = (cols <= rows)[None, None]  # (1, 1, c, k_stop)
        out = cm if out is None else out & cm
    return out


def _slice_mask(m: Tensor, start: int, stop: int, k_stop: int) -> Tensor:
    """Rows [start, stop) and keys [0, k_stop) of a 4-D mask whose broadcast dims have size 1."""
    if m.shape[2] != 1:
        m = m[:, :, start:stop]
    if m.shape[3] != 1:
        m = m[:, :, :, :k_stop]
    return m


def _key_stop(masks: Masks, stop: int) -> int:
    """Keys a chunk ending at query ``stop`` can see: causal row i never looks past key
    i + q_offset, so the chunk needs keys [0, stop + q_offset). 0 for a chunk of rows that see
    no key (lower-right with Lq > Lk: q_offset < 0)."""
    return max(0, min(stop + masks.q_offset, masks.k_len)) if masks.is_causal else masks.k_len


class _ChunkedAdditive(torch.autograd.Function):
    """Additive attention over query chunks, with activation checkpointing written by hand.

    Forward saves only the small inputs (projections, V, masks), never a pairwise tensor; backward
    recomputes each chunk's tanh tensor. All chunks share ONE workspace of (B, H, chunk, Lk, d_a)
    floats per pass, updated in place: autograd around the same ops (``torch.utils.checkpoint``)
    needs three such buffers per chunk, runs tanh twice in backward, and allocating a fresh buffer
    per chunk fragments glibc's heap (RSS grew to 2 GB at L=1024, chunk 8). Measured in
    docs/variants/additive.md.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor,
        bias: Tensor | None, masks: Masks, scale: float, dropout_p: float, chunk: int,
    ) -> Tensor:
        b, h, lq, d_a = qp.shape
        out = value.new_empty(b, h, lq, value.shape[-1])  # (B, H, Lq, Ev)
        ws = qp.new_empty(b * h * min(chunk, lq) * kp.shape[2] * d_a)  # flat workspace
        # One draw from the global RNG (so torch.manual_seed makes dropout reproducible); each
        # chunk's keep-mask comes from a generator seeded by (seed, chunk index), so backward
        # regenerates it instead of keeping B*H*Lq*Lk bools alive until then.
        seed = _draw_seed() if dropout_p > 0 else None
        gen = torch.Generator(device=qp.device) if seed is not None else None
        for idx, (start, stop, k_stop) in enumerate(_chunks(masks, chunk)):
            if k_stop == 0:  # rows that see no key: output 0, like any row with nothing to attend
                out[:, :, start:stop] = 0.0
                continue
            t = _tanh_into(ws, qp[:, :, start:stop], kp[:, :, :k_stop])  # (B, H, c, k_stop, d_a)
            p = _softmax(t, w_v, scale, bias, masks, start, stop, k_stop)  # (B, H, c, k_stop)
            if gen is not None:
                p = p * _keep_mask(p, dropout_p, gen, seed, idx) / (1.0 - dropout_p)
            out[:, :, start:stop] = p @ value[:, :, :k_stop]  # (B, H, c, Ev)
        ctx.save_for_backward(qp, kp, w_v, value, bias)
        ctx.masks, ctx.seed, ctx.scale, ctx.dropout_p, ctx.chunk = masks, seed, scale, dropout_p, chunk
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable again
            return _differentiable_backward(ctx, d_out)
        qp, kp, w_v, value, bias = ctx.saved_tensors
        masks, scale, p_drop = ctx.masks, ctx.scale, ctx.dropout_p
        b, h, lq, d_a = qp.shape
        d_qp = torch.empty_like(qp)  # (B, H, Lq, d_a): every row is written once
        d_kp = torch.zeros_like(kp)  # (B, H, Lk, d_a): accumulated over chunks
        d_w_v = torch.zeros_like(w_v)  # (H, d_a)
        d_value = torch.zeros_like(value)  # (B, H, Lk, Ev)
        d_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[4] else None
        ws = qp.new_empty(b * h * min(ctx.chunk, lq) * kp.shape[2] * d_a)
        v_b = w_v[None, :, None, :]  # (1, H, 1, d_a)
        gen = torch.Generator(device=qp.device) if ctx.seed is not None else None
        for idx, (start, stop, k_stop) in enumerate(_chunks(masks, ctx.chunk)):
            if k_stop == 0:  # output 0 whatever the inputs: no gradient
                d_qp[:, :, start:stop] = 0.0
                continue
            c = stop - start
            t = _tanh_into(ws, qp[:, :, start:stop], kp[:, :, :k_stop])  # recomputed (B, H, c, k_stop, d_a)
            p = _softmax(t, w_v, scale, bias, masks, start, stop, k_stop)  # (B, H, c, k_stop)
            # The forward's keep-mask of this chunk, regenerated from the same seed.
            keep = None if gen is None else _keep_mask(p, p_drop, gen, ctx.seed, idx)  # (B, H, c, k_stop)
            p_used = p if keep is None else p * keep / (1.0 - p_drop)  # the weights applied to V
            d_o = d_out[:, :, start:stop]  # (B, H, c, Ev)
            v_c = value[:, :, :k_stop]  # (B, H, k_stop, Ev)
            d_value[:, :, :k_stop] += p_used.transpose(-2, -1) @ d_o
            d_p = d_o @ v_c.transpose(-2, -1)  # (B, H, c, k_stop)
            if keep is not None:
                d_p = d_p * keep / (1.0 - p_drop)
            # Softmax backward; masked entries have p = 0 and get no gradient (empty rows: all 0).
            d_s = p * (d_p - (p * d_p).sum(-1, keepdim=True))  # (B, H, c, k_stop)
            if d_bias is not None:
                _slice_mask(d_bias, start, stop, k_stop).add_(d_s.sum_to_size(
                    _slice_mask(bias, start, stop, k_stop).shape))
            g = d_s * scale  # (B, H, c, k_stop): d loss / d (v_h . tanh(...))
            d_w_v += (g.reshape(b, h, 1, c * k_stop) @ t.view(b, h, c * k_stop, d_a)).sum(0).view(h, d_a)
            # d pre-activation = g * v_h * (1 - t^2), summed over keys (d qp) and queries (d kp);
            # written as g - g * t^2 so that t is reused in place (no second pairwise buffer).
            t.square_().mul_(g.unsqueeze(-1))  # (B, H, c, k_stop, d_a): g * t^2
            d_qp[:, :, start:stop] = (g.sum(-1, keepdim=True) - t.sum(3)) * v_b
            d_kp[:, :, :k_stop] += (g.sum(-2).unsqueeze(-1) - t.sum(2)) * v_b
        return d_qp, d_kp, d_w_v, d_value, d_bias, None, None, None, None


def _differentiable_forward(qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor, bias: Tensor | None,
                            masks: Masks, scale: float, p_drop: float, chunk: int, seed: int | None
                            ) -> Tensor:
    """The output of ``_ChunkedAdditive`` with autograd ops, chunk by chunk, the same dropout masks."""
    gen = torch.Generator(device=qp.device) if seed is not None else None
    parts = []
    for idx, (start, stop, k_stop) in enumerate(_chunks(masks, chunk)):
        if k_stop == 0:
            parts.append(value.new_zeros(*value.shape[:2], stop - start, value.shape[-1]))
            continue
        t = torch.tanh(qp[:, :, start:stop, None] + kp[:, :, None, :k_stop])  # (B, H, c, k_stop, d_a)
        p = _softmax(t, w_v, scale, bias, masks, start, stop, k_stop)  # (B, H, c, k_stop)
        if gen is not None:
            assert seed is not None
            p = p * _keep_mask(p, p_drop, gen, seed, idx) / (1.0 - p_drop)
        parts.append(p @ value[:, :, :k_stop])  # (B, H, c, Ev)
    return torch.cat(parts, dim=2)


def _differentiable_backward(ctx: torch.autograd.function.FunctionCtx, d_out: Tensor
                             ) -> tuple[Tensor | None, ...]:
    """Gradients of ``_ChunkedAdditive`` that autograd can differentiate again: those of
    ``_differentiable_forward`` from the saved inputs, with a graph (``create_graph=True``)."""
    saved = ctx.saved_tensors
    inputs = [(i, t) for i, t in enumerate(saved) if ctx.needs_input_grad[i]]
    with torch.enable_grad():
        out = _differentiable_forward(*saved, ctx.masks, ctx.scale, ctx.dropout_p, ctx.chunk, ctx.seed)
        got = torch.autograd.grad(out, [t for _, t in inputs], d_out, create_graph=True, allow_unused=True)
    res: list[Tensor | None] = [None] * 9
    for (i, t), g in zip(inputs, got, strict=True):
        res[i] = torch.zeros_like(t) if g is None else g
    return tuple(res)


def _chunks(masks: Masks, chunk: int) -> list[tuple[int, int, int]]:
    """(start, stop, k_stop) of every query chunk; k_stop = keys the chunk can see."""
    return [(s, min(s + chunk, masks.q_len), _key_stop(masks, min(s + chunk, masks.q_len)))
            for s in range(0, masks.q_len, chunk)]


def _draw_seed() -> int:
    """A 63-bit seed drawn from torch's global (CPU) RNG: reproducible under ``torch.manual_seed``."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def _keep_mask(p: Tensor, dropout_p: float, gen: torch.Generator, seed: int, idx: int) -> Tensor:
    """Bool keep-mask shaped like ``p`` for chunk ``idx``: a pure function of (seed, idx, shape,
    device), so forward and backward draw the same one. ``gen`` is re-seeded, not shared state."""
    gen.manual_seed(mix_seed(seed, idx))  # chunks' streams are unrelated
    return torch.empty_like(p, dtype=torch.bool).bernoulli_(1.0 - dropout_p, generator=gen)


def _tanh_into(ws: Tensor, qp: Tensor, kp: Tensor) -> Tensor:
    """tanh(qp_i + kp_j) written into the workspace ``ws``: (B, H, c, Lk, d_a)."""
    b, h, c, d_a = qp.shape
    t = ws[: b * h * c * kp.shape[2] * d_a].view(b, h, c, kp.shape[2], d_a)
    torch.add(qp.unsqueeze(3), kp.unsqueeze(2), out=t)
    return t.tanh_()


def _softmax(
    t: Tensor, w_v: Tensor, scale: float, bias: Tensor | None, masks: Masks, start: int, stop: int,
    k_stop: int,
) -> Tensor:
    """Masked softmax of ``scale * t @ v_h (+ float mask)`` for one chunk: (B, H, c, k_stop)."""
    s = _contract_v(t, w_v) * scale  # (B, H, c, Lk)
    if bias is not None:
        s = s + _slice_mask(bias, start, stop, k_stop)
    return masked_softmax(s, chunk_allowed(masks, start, stop, k_stop, t.device))


def chunked_attention(
    qp: Tensor, kp: Tensor, w_v: Tensor, value: Tensor, masks: Masks, scale: float,
    dropout_p: float, chunk: int,
) -> Tensor:
    """Additive attention output (B, H, Lq, Ev), ``chunk`` query rows at a time.

    Args:
        qp: (B, H, Lq, d_a) = Q W_q + b;  kp: (B, H, Lk, d_a) = K W_k;  w_v: (H, d_a);
        value: (B, H, Lk, Ev), all in the compute dtype.
    Forward and backward peak at one (B, H, chunk, Lk, d_a) workspace. With dropout, one seed
    is drawn from the global RNG and each chunk's keep-mask is generated from (seed, chunk index),
    in forward and again in backward: no (B, H, Lq, Lk) mask is kept between them.
    """
    bias = masks.float_mask
    if bias is not None:
        bias = bias.to(qp.dtype)  # (B|1, H|1, Lq|1, Lk|1)
    return _ChunkedAdditive.apply(qp, kp, w_v, value, bias, masks, scale, dropout_p, chunk)


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

