"""Ring attention: ``dot_product`` over a sequence split across a process group.

Each rank keeps its query shard. Key/value shards (and their ``key_mask``) travel around the
ring, rank r -> r + 1, one hop per step, the next hop's transfer overlapping the current step's
compute; after P steps every query has met every key. Each (query piece, key piece) block gives
a partial output normalised over its own keys and its log-sum-exp; ``lse_merge`` folds the
blocks into the exact softmax over all keys, without ever holding more than one key shard.

Under ``is_causal`` the zigzag layout (``attnreg.core.parallel.SequenceLayout``: rank r holds
chunks r and 2P-1-r) gives every rank the same number of unmasked blocks; blocks entirely in
the future of their queries are skipped, blocks entirely in the past need no mask.

Backward (a second ring pass) recomputes each block's weights from the saved output and
log-sum-exp (flash-attention style: nothing of size Lq x Lk is kept) and sends, with each
key/value shard, the accumulators of its gradients; after P hops they arrive back at the shard's
owner. Per rank: forward sends (P-1) key/value shards, backward (P-1) key/value shards and P
gradient shards, O(L/P * (E + Ev)) each.

Grouped-query key/value (Hkv heads) travel as they are (Hkv heads, never copied per query head
for the transfer). The block math is in ``blocks.py``: torch's fused CPU flash kernels where
they apply, the explicit tiled formula otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnreg.core import Masks
from attnreg.core.parallel import Piece, SequenceLayout, ShardContext, exchange, start_exchange

from .blocks import block_backward, block_forward

__all__ = ["ring_attention", "ring_blocks"]

# Tag base of the gradient messages: they are in flight while the next key/value shard (tags 0..2)
# is still arriving from the same neighbour.
_GRAD_TAG = 8


def ring_attention(query: Tensor, key: Tensor, value: Tensor, masks: Masks, ctx: ShardContext,
                   scale: float, acc: torch.dtype) -> Tensor:
    """This rank's output shard (B, H, Lq_local, Ev) of softmax attention over the whole sequence.

    ``masks``: the local ``key_mask`` shard and the global causal flag and offset (query i of
    the global sequence sees keys j <= i + ``masks.q_offset``). Arithmetic in ``acc``.
    """
    return _Ring.apply(query, key, value, masks.key_mask, ctx, scale, masks.is_causal, masks.q_offset, acc)


def _diff(qp: Piece, kp: Piece, offset: int) -> int:
    """Causal: query row i of ``qp`` sees key column j of ``kp`` iff j <= i + diff."""
    return qp.start + offset - kp.start


def ring_blocks(q_layout: SequenceLayout, k_layout: SequenceLayout, rank: int, src: int, causal: bool,
                offset: int) -> list[tuple[Piece, Piece, bool]]:
    """The blocks ``rank`` computes when it holds ``src``'s key/value shard: (query piece, key
    piece, causal mask needed). Under ``is_causal`` blocks entirely in the future of their
    queries are left out, and blocks entirely in their past need no mask."""
    out = []
    for qp in q_layout.pieces(rank):
        for kp in k_layout.pieces(src):
            if not causal:
                out.append((qp, kp, False))
                continue
            d = _diff(qp, kp, offset)
            if qp.length - 1 + d >= 0:  # the last query sees at least the piece's first key
                out.append((qp, kp, kp.length - 1 > d))
    return out


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, km: Tensor | None,  # type: ignore[override]
                sc: ShardContext, scale: float, causal: bool, offset: int, acc: torch.dtype) -> Tensor:
        b, h, nq, _ = q.shape
        qa = q.to(acc).contiguous()  # (B, H, nq, E)
        out = qa.new_zeros(b, h, nq, v.shape[-1])  # (B, H, nq, Ev)
        lse = qa.new_full((b, h, nq), float("-inf"))  # (B, H, nq)
        for src, shard in _ring(sc, k, v, km):
            for qp, kp, masked in ring_blocks(sc.q_layout, sc.k_layout, sc.rank, src, causal, offset):
                rows = slice(qp.local, qp.local + qp.length)
                block_forward(qa[:, :, rows], *_kv(*shard, kp), _diff(qp, kp, offset) if masked else None,
                              scale, out[:, :, rows], lse[:, :, rows])
            del shard  # the ring frees a received shard once no one holds it, before the next arrives
        ctx.save_for_backward(qa, k, v, km, out, lse)
        ctx.args = (sc, scale, causal, offset, acc, q.dtype)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qa, k, v, km, out, lse = ctx.saved_tensors
        sc, scale, causal, offset, acc, q_dtype = ctx.args
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        do = grad.to(acc).contiguous()  # (B, H, nq, Ev)
        delta = (do * out).sum(dim=-1)  # (B, H, nq)
        dq = torch.zeros_like(qa) if need_q else None
        nxt, prv = (sc.rank + 1) % sc.world, (sc.rank - 1) % sc.world
        dk = k.new_zeros(k.shape, dtype=acc) if need_k else None  # for the shard now held
        dv = v.new_zeros(v.shape, dtype=acc) if need_v else None
        for step, (src, shard) in enumerate(_ring(sc, k, v, km)):
            for qp, kp, masked in ring_blocks(sc.q_layout, sc.k_layout, sc.rank, src, causal, offset):
                rows = slice(qp.local, qp.local + qp.length)
                block_backward(qa[:, :, rows], *_kv(*shard, kp), _diff(qp, kp, offset) if masked else None,
                               scale, do[:, :, rows], out[:, :, rows], lse[:, :, rows], delta[:, :, rows],
                               None if dq is None else dq[:, :, rows],
                               None if dk is None else dk.narrow(2, kp.local, kp.length),
                               None if dv is None else dv.narrow(2, kp.local, kp.length))
            if sc.world > 1 and (dk is not None or dv is not None):
                # The accumulators follow their shard to the next rank; after the last step they
                # hold every rank's contribution and reach the shard's owner.
                n = sc.k_layout.shard_length((sc.rank - step - 1) % sc.world)
                bufs = [t.new_empty(t.shape[0], t.shape[1], n, t.shape[3]) for t in (dk, dv) if t is not None]
                exchange([(nxt, t) for t in (dk, dv) if t is not None], [(prv, t) for t in bufs], sc.group,
                         kind="ring_grad", tag=_GRAD_TAG)
                it = iter(bufs)  # the sent accumulators are dropped here (no other reference)
                dk = next(it) if dk is not None else None
                dv = next(it) if dv is not None else None
                del it, bufs
            del shard
        return (None if dq is None else dq.to(q_dtype),
                None if dk is None else dk.to(k.dtype), None if dv is None else dv.to(v.dtype),
                None, None, None, None, None, None)


def _kv(k: Tensor, v: Tensor, km: Tensor | None, kp: Piece) -> tuple[Tensor, Tensor, Tensor | None]:
    """The piece's keys (B, Hkv, nk, E), values (B, Hkv, nk, Ev) and key mask (B, nk) (views)."""
    return (k.narrow(2, kp.local, kp.length), v.narrow(2, kp.local, kp.length),
            None if km is None else km.narrow(1, kp.local, kp.length))


def _ring(sc: ShardContext, k: Tensor, v: Tensor, km: Tensor | None):  # noqa: ANN202 (a generator)
    """Yield (source rank, its key/value/key_mask shard) for the P steps of the ring, the next
    shard's transfer (from rank - 1, ours to rank + 1) running while the caller computes."""
    cur = [t for t in (k, v, km) if t is not None]
    nxt, prv = (sc.rank + 1) % sc.world, (sc.rank - 1) % sc.world
    for step in range(sc.world):
        src = (sc.rank - step) % sc.world
        pending, bufs = None, []
        if step < sc.world - 1:
            n = sc.k_layout.shard_length((src - 1) % sc.world)
            bufs = [t.new_empty((t.shape[0], n) if t.dim() == 2 else (t.shape[0], t.shape[1], n, t.shape[3]))
                    for t in cur]
            pending = start_exchange([(nxt, t) for t in cur], [(prv, t) for t in bufs], sc.group,
                                     kind="ring_kv")
        yield src, (cur[0], cur[1], cur[2] if km is not None else None)
        if pending is not None:
            pending.wait()
            cur = bufs
