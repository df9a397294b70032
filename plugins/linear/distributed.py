"""``linear`` / ``performer`` over a sequence split across a process group.

Every output depends on the keys only through the sums ``S = sum_j phi(k_j) [v_j, 1]^T``
(F x (Ev + 1), the normaliser as an extra column) over the keys it sees. Each rank sums its own
keys (``key_state``), and only those sums travel:

- non-causal: one all-reduce of S; every query reads the total (``state_readout``).
- causal: each of the rank's two chunks (the zigzag layout) needs the sum over every chunk
  before it: ``chunk_prefix`` (two exclusive scans over ranks and one all-reduce); the chunk
  then runs the single-process chunked kernel started from that prefix
  (``linear_attention_step``, the same function decoding uses).

Communication is O(F * (Ev + 1)) per rank and message (O(log P) messages), independent of the
sequence length; backward sends the adjoint sums the same way. FAVOR+ (``performer``) also needs
the single-process key stabiliser, a constant subtracted from every key exponent that must be the
same on every rank (the ranks' sums are added): the maximum exponent over every real key
(non-causal, one all-reduce of (B, H)) or that of the globally first real key (causal, two
all-reduces of (B,) and (B, H)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnreg.core import Masks, UnsupportedFeatureError
from attnreg.core.parallel import ShardContext, all_reduce_, all_reduce_sum, chunk_prefix

from .features import favor_args, feature_pair
from .kernels import key_state, linear_attention_step, state_readout

if TYPE_CHECKING:
    from .attention import LinearAttention

__all__ = ["linear_sharded"]


def linear_sharded(module: LinearAttention, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                   ctx: ShardContext) -> Tensor:
    """This rank's output shard (B, H, Lq_local, Ev) of ``module`` over the whole sequences."""
    causal = masks.is_causal
    if causal and (ctx.q_layout != ctx.k_layout or masks.q_offset != 0):
        raise UnsupportedFeatureError(module.variant, "causal attention with Lq != Lk under a process group")
    acc, seg = module._accum_dtype(query), module.config.segment_size
    km = masks.key_mask
    allowed = None if km is None else km[:, None, :, None]  # (B, 1, Lk, 1)
    q, k, fmap, eps = query, key, module.feature_map, module.eps  # elu / relu: applied in the kernels
    if module.feature_map == "favor":
        q, k = _favor(module, query, key, km, causal, ctx)
        fmap = "identity"
    if not causal:
        total = all_reduce_sum(key_state(k, value, fmap, allowed, acc, seg), ctx.group)  # (B, H, F, Ev + 1)
        return state_readout(q, total, fmap, eps, acc, seg).to(query.dtype)
    pieces = ctx.q_layout.pieces(ctx.rank)

    def rows(t: Tensor | None, i: int) -> Tensor | None:
        p = pieces[i]
        return None if t is None else t.narrow(2, p.local, p.length)

    states = [key_state(rows(k, i), rows(value, i), fmap, rows(allowed, i), acc, seg) for i in (0, 1)]
    before = chunk_prefix(states[0], states[1], ctx.group)  # (B, H, F, Ev + 1) each
    outs = [linear_attention_step(rows(q, i), rows(k, i), rows(value, i), fmap, rows(allowed, i),
                                  eps, before[i], module.chunk_size, acc, seg)[0]
            for i in (0, 1)]  # (B, H, n_i, Ev)
    return torch.cat(outs, dim=2).to(query.dtype)


def _favor(module: LinearAttention, query: Tensor, key: Tensor, km: Tensor | None, causal: bool,
           ctx: ShardContext) -> tuple[Tensor, Tensor]:
    """FAVOR+ features (phi_q, phi_k) with the key stabiliser of the whole sequence."""
    acc = module._accum_dtype(query)
    e = query.shape[-1]
    proj = module.projection(e, query.device, acc)  # (m, E)
    scale = module.softmax_scale(e)
    q, k = query.to(acc), key.to(acc)  # (B, H, L, E)
    allowed = None if km is None else km[:, None, :, None]  # (B, 1, Lk, 1)
    if causal:  # the stabiliser of the first real key of the sequence, wherever it is
        anchor = _first_key_anchor(k, km, proj, scale, ctx)  # (B, H, 1, 1)
        fp = feature_pair("favor", q, k, allowed, proj, scale, True, anchor)
        return fp.phi_q, fp.phi_k
    if allowed is not None:
        k = k.masked_fill(~allowed, 0.0)  # padding values never reach the math
    arg_q = favor_args(q, proj, scale)  # (B, H, Lq, m)
    arg_k = favor_args(k, proj, scale)  # (B, H, Lk, m)
    if allowed is not None:
        arg_k = arg_k.masked_fill(~allowed, float("-inf"))
    c_q = arg_q.amax(dim=-1, keepdim=True).detach()  # (B, H, Lq, 1)
    c_k = arg_k.detach().amax(dim=(-2, -1), keepdim=True).contiguous()  # (B, H, 1, 1); -inf: no real key
    c_k = all_reduce_(c_k, ctx.group, "max", kind="favor_stabiliser")
    c_k = torch.where(torch.isfinite(c_k), c_k, torch.zeros_like(c_k))
    return torch.exp(arg_q - c_q), torch.exp(arg_k - c_k)


@torch.no_grad()
def _first_key_anchor(k: Tensor, km: Tensor | None, proj: Tensor, scale: float, ctx: ShardContext
                      ) -> Tensor:
    """The largest FAVOR+ exponent of each sequence's first real key (B, H, 1, 1), -inf where a
    sequence has none: the causal stabiliser ``feature_pair`` uses on one process."""
    b, h, _, e = k.shape
    length = ctx.k_layout.length
    pos = torch.full((b,), length, dtype=torch.int64, device=k.device)  # global position; L = none
    val = torch.full((b, h), float("-inf"), dtype=k.dtype, device=k.device)
    for p in ctx.k_layout.pieces(ctx.rank):
        real = (torch.ones(b, p.length, dtype=torch.bool, device=k.device) if km is None
                else km.narrow(1, p.local, p.length))  # (B, n)
        idx = real.to(torch.int8).argmax(dim=1)  # (B,): first real key of the piece (0 if none)
        first = k.narrow(2, p.local, p.length).gather(2, idx[:, None, None, None].expand(b, h, 1, e))
        here = torch.where(real.any(dim=1), p.start + idx, torch.full_like(idx, length))  # (B,)
        better = here < pos
        pos = torch.where(better, here, pos)
        val = torch.where(better[:, None], favor_args(first, proj, scale).amax(dim=-1)[..., 0], val)
    first_pos = all_reduce_(pos.clone(), ctx.group, "min", kind="favor_stabiliser")
    holds_first = ((pos == first_pos) & (pos < length))[:, None]  # (B, 1)
    mine = torch.where(holds_first, val, torch.full_like(val, float("-inf")))
    return all_reduce_(mine.contiguous(), ctx.group, "max", kind="favor_stabiliser")[:, :, None, None]
