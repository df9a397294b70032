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

Grouped-query key/value (Hkv heads) travel as they are: the G = H / Hkv query heads of a group
are folded into the block's rows, never copied per head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnreg.core import Masks, causal_mask
from attnreg.core.parallel import Piece, SequenceLayout, ShardContext, exchange, lse_merge, start_exchange

__all__ = ["ring_attention", "ring_blocks"]

# Scores held at once per block tile (B * H * rows * keys): bounds the working set of a block,
# whatever the shard length (8 MB in float32).
_TILE_ELEMENTS = 1 << 21
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


def _allowed(rows: tuple[int, int], kp_len: int, diff: int | None, km: Tensor | None,
             device: torch.device) -> Tensor | None:
    """Bool (B|1, 1, 1, rows, Lk_piece) of allowed entries of a tile, None if all are."""
    out = None
    if diff is not None:
        out = causal_mask(rows[1] - rows[0], kp_len, device, diff + rows[0])  # (rows, nk)
    if km is not None:
        kmb = km[:, None, None, None, :]  # (B, 1, 1, 1, nk)
        out = kmb if out is None else out & kmb
    return out


def _tiles(b: int, h: int, n_rows: int, n_keys: int) -> list[tuple[int, int]]:
    step = max(1, _TILE_ELEMENTS // max(1, b * h * n_keys))
    return [(t0, min(n_rows, t0 + step)) for t0 in range(0, n_rows, step)]


def _kv(k: Tensor, v: Tensor, km: Tensor | None, kp: Piece, acc: torch.dtype
        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The piece's keys (B, Hkv, 1, nk, E), values (B, Hkv, 1, nk, Ev) in ``acc`` and mask (B, nk)."""
    ks = k.narrow(2, kp.local, kp.length).to(acc)[:, :, None]
    vs = v.narrow(2, kp.local, kp.length).to(acc)[:, :, None]
    return ks, vs, (None if km is None else km.narrow(1, kp.local, kp.length))


def _scores(q: Tensor, ks: Tensor, rows: tuple[int, int], allowed: Tensor | None, scale: float) -> Tensor:
    s = (q[..., rows[0]:rows[1], :] @ ks.transpose(-1, -2)) * scale  # (B, Hkv, G, tq, nk)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def _block_forward(q: Tensor, ks: Tensor, vs: Tensor, km: Tensor | None, diff: int | None,
                   scale: float, out: Tensor, lse: Tensor) -> None:
    """Merge one block into ``out`` (B, Hkv, G, nq, Ev) / ``lse`` (B, Hkv, G, nq) in place."""
    b, hkv, g, nq, _ = q.shape
    for rows in _tiles(b, hkv * g, nq, ks.shape[3]):
        s = _scores(q, ks, rows, _allowed(rows, ks.shape[3], diff, km, q.device), scale)
        lse_t = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, tq); -inf where no key is allowed
        safe = torch.where(torch.isfinite(lse_t), lse_t, torch.zeros_like(lse_t))
        o_t = torch.exp(s - safe[..., None]) @ vs  # (B, Hkv, G, tq, Ev)
        o_view, l_view = out[..., rows[0]:rows[1], :], lse[..., rows[0]:rows[1]]
        o_new, l_new = lse_merge(o_view, l_view, o_t, lse_t)
        o_view.copy_(o_new)
        l_view.copy_(l_new)


def _block_backward(q: Tensor, ks: Tensor, vs: Tensor, km: Tensor | None, diff: int | None,
                    scale: float, do: Tensor, lse: Tensor, delta: Tensor, dq: Tensor | None,
                    dk: Tensor | None, dv: Tensor | None) -> None:
    """Add one block's gradient contributions into ``dq`` (B, Hkv, G, nq, E), ``dk`` / ``dv``
    (B, Hkv, nk, E|Ev) of its key piece, from the final ``lse`` and ``delta = rowsum(dO * O)``."""
    b, hkv, g, nq, _ = q.shape
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no key: p = 0
    for r0, r1 in _tiles(b, hkv * g, nq, ks.shape[3]):
        s = _scores(q, ks, (r0, r1), _allowed((r0, r1), ks.shape[3], diff, km, q.device), scale)
        p = torch.exp(s - safe[..., r0:r1, None])  # (B, Hkv, G, tq, nk): the final weights
        do_t = do[..., r0:r1, :]  # (B, Hkv, G, tq, Ev)
        if dv is not None:
            dv.add_((p.transpose(-1, -2) @ do_t).sum(dim=2))  # (B, Hkv, nk, Ev)
        ds = p * (do_t @ vs.transpose(-1, -2) - delta[..., r0:r1, None])  # (B, Hkv, G, tq, nk)
        if dq is not None:
            dq[..., r0:r1, :].add_(ds @ ks, alpha=scale)  # (B, Hkv, G, tq, E)
        if dk is not None:
            dk.add_((ds.transpose(-1, -2) @ q[..., r0:r1, :]).sum(dim=2), alpha=scale)  # (B, Hkv, nk, E)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, km: Tensor | None,  # type: ignore[override]
                sc: ShardContext, scale: float, causal: bool, offset: int, acc: torch.dtype) -> Tensor:
        b, h, nq, e = q.shape
        hkv, ev = k.shape[1], v.shape[-1]
        q5 = q.to(acc).reshape(b, hkv, h // hkv, nq, e)  # (B, Hkv, G, nq, E): a group's heads as rows
        out = q5.new_zeros(b, hkv, h // hkv, nq, ev)  # (B, Hkv, G, nq, Ev)
        lse = q5.new_full((b, hkv, h // hkv, nq), float("-inf"))  # (B, Hkv, G, nq)
        for src, (ck, cv, ckm) in _ring(sc, k, v, km):
            for qp, kp, masked in ring_blocks(sc.q_layout, sc.k_layout, sc.rank, src, causal, offset):
                rows = slice(qp.local, qp.local + qp.length)
                ks, vs, kms = _kv(ck, cv, ckm, kp, acc)
                _block_forward(q5[..., rows, :], ks, vs, kms, _diff(qp, kp, offset) if masked else None,
                               scale, out[..., rows, :], lse[..., rows])
        ctx.save_for_backward(q5, k, v, km, out, lse)
        ctx.args = (sc, scale, causal, offset, acc, q.dtype)
        return out.reshape(b, h, nq, ev).to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q5, k, v, km, out, lse = ctx.saved_tensors
        sc, scale, causal, offset, acc, q_dtype = ctx.args
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        b, hkv, g, nq, e = q5.shape
        do = grad.to(acc).reshape(out.shape)  # (B, Hkv, G, nq, Ev)
        delta = (do * out).sum(dim=-1)  # (B, Hkv, G, nq)
        dq = torch.zeros_like(q5) if need_q else None
        nxt, prv = (sc.rank + 1) % sc.world, (sc.rank - 1) % sc.world
        dk = k.new_zeros(k.shape, dtype=acc) if need_k else None  # for the shard now held
        dv = v.new_zeros(v.shape, dtype=acc) if need_v else None
        for step, (src, (ck, cv, ckm)) in enumerate(_ring(sc, k, v, km)):
            for qp, kp, masked in ring_blocks(sc.q_layout, sc.k_layout, sc.rank, src, causal, offset):
                rows = slice(qp.local, qp.local + qp.length)
                ks, vs, kms = _kv(ck, cv, ckm, kp, acc)
                _block_backward(q5[..., rows, :], ks, vs, kms, _diff(qp, kp, offset) if masked else None,
                                scale, do[..., rows, :], lse[..., rows], delta[..., rows],
                                None if dq is None else dq[..., rows, :],
                                None if dk is None else dk.narrow(2, kp.local, kp.length),
                                None if dv is None else dv.narrow(2, kp.local, kp.length))
            if sc.world > 1 and (dk is not None or dv is not None):
                # The accumulators follow their shard to the next rank; after the last step they
                # hold every rank's contribution and reach the shard's owner.
                n = sc.k_layout.shard_length((sc.rank - step - 1) % sc.world)
                sends = [(nxt, t) for t in (dk, dv) if t is not None]
                bufs = [t.new_empty(t.shape[0], t.shape[1], n, t.shape[3]) for t in (dk, dv) if t is not None]
                exchange(sends, [(prv, t) for t in bufs], sc.group, kind="ring_grad", tag=_GRAD_TAG)
                it = iter(bufs)
                dk = next(it) if dk is not None else None
                dv = next(it) if dv is not None else None
        return (None if dq is None else dq.reshape(b, hkv * g, nq, e).to(q_dtype),
                None if dk is None else dk.to(k.dtype), None if dv is None else dv.to(v.dtype),
                None, None, None, None, None, None)


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
