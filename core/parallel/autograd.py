"""Differentiable collectives of context parallelism: each forward communication has its
adjoint communication in backward (an ``autograd.Function`` per call, so that every rank runs
the same communication in the same order in backward too).

- ``all_reduce_sum``: forward sum over ranks; backward sums the gradients over ranks.
- ``exclusive_scan``: ``out_r = sum_{r' < r} x_r'`` (or ``r' > r`` with ``reverse``) by recursive
  doubling, ceil(log2 P) messages per rank; backward is the scan in the other direction.
- ``chunk_prefix``: the sum of everything before each of a rank's two chunks of the zigzag
  layout (``layout.py``), in sequence order: what a recurrent state carries into a chunk.
- ``fetch_ranges``: every rank asks for runs of global positions (a halo) and receives them from
  their owners; backward sends the gradients of the received positions back to their owners.
- ``lse_merge``: combine two softmax partial outputs by their log-sum-exp (no communication).

Every rank must call these with the same arguments apart from the tensors' contents and lengths,
and must run backward if any rank does (the gradient messages pair up across ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .comm import all_reduce_, exchange, group_rank_size
from .layout import Piece, SequenceLayout

__all__ = ["all_reduce_sum", "chunk_prefix", "exclusive_scan", "fetch_ranges", "lse_merge"]


def lse_merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention over the union of two disjoint key sets from each set's normalised
    output ``(..., N, Ev)`` and log-sum-exp ``(..., N)``. Rows with no key in either set
    (lse = -inf in both) stay 0 with lse -inf; never NaN."""
    lse = torch.logaddexp(lse_a, lse_b)  # (..., N)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # exp(-inf - 0) = 0 below
    return out_a * torch.exp(lse_a - safe)[..., None] + out_b * torch.exp(lse_b - safe)[..., None], lse


def _scan(x: Tensor, group: Any, reverse: bool) -> Tensor:
    """Exclusive scan over ranks (recursive doubling); ``reverse`` sums the later ranks instead."""
    rank, world = group_rank_size(group)
    pos = world - 1 - rank if reverse else rank  # place in scan order

    def peer(p: int) -> int:
        return world - 1 - p if reverse else p

    excl, incl = torch.zeros_like(x), x.contiguous()
    d = 1
    while d < world:
        got = torch.empty_like(x)
        sends = [(peer(pos + d), incl)] if pos + d < world else []
        recvs = [(peer(pos - d), got)] if pos - d >= 0 else []
        exchange(sends, recvs, group, kind="scan")
        if recvs:  # fresh tensors: the one just sent is never modified
            excl, incl = got + excl, got + incl
        d *= 2
    return excl


def _sum(x: Tensor, group: Any) -> Tensor:
    return all_reduce_(x.detach().clone(memory_format=torch.contiguous_format), group, "sum")


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _sum(x, group)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _sum(grad, ctx.group), None


def all_reduce_sum(x: Tensor, group: Any) -> Tensor:
    """The sum of ``x`` over the ranks of ``group`` (a new tensor), differentiable."""
    return _AllReduceSum.apply(x, group)


class _ExclusiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, reverse: bool) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.reverse = group, reverse
        return _scan(x.detach(), group, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # x_r feeds out_r' for every later r' (earlier, if reverse): the adjoint scans the other way.
        return _scan(grad, ctx.group, not ctx.reverse), None, None


def exclusive_scan(x: Tensor, group: Any, reverse: bool = False) -> Tensor:
    """``sum_{r' < rank} x_r'`` over ``group`` (``r' > rank`` with ``reverse``; 0 on the first
    rank), differentiable. ceil(log2 P) messages of ``x``'s size per rank."""
    return _ExclusiveScan.apply(x, group, reverse)


class _ChunkPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, front: Tensor, back: Tensor, group: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.group = group
        front, back = front.detach(), back.detach()
        # Chunk order 0..P-1 are the front chunks of ranks 0..P-1, then the back chunks of
        # ranks P-1..0: before front chunk r come the front chunks of ranks < r; before back
        # chunk r come every front chunk and the back chunks of ranks > r.
        before_front = _scan(front, group, reverse=False)
        before_back = _sum(front, group) + _scan(back, group, reverse=True)
        return before_front, before_back

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_front: Tensor, g_back: Tensor) -> tuple[Tensor, Tensor, None]:
        d_front = _scan(g_front, ctx.group, reverse=True) + _sum(g_back, ctx.group)
        d_back = _scan(g_back, ctx.group, reverse=False)
        return d_front, d_back, None


def chunk_prefix(front: Tensor, back: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """Sums over everything before this rank's two chunks of the zigzag layout.

    ``front`` / ``back``: a quantity summed over this rank's front / back chunk (e.g. the state
    ``sum phi(k) v^T`` of a linear attention), same shape on every rank. Returns (the sum over
    every chunk before the front chunk, the sum over every chunk before the back chunk),
    differentiable. Two scans and one all-reduce: O(log P) messages of that size per rank,
    independent of the sequence length.
    """
    return _ChunkPrefix.apply(front, back, group)


# -- fetching runs of positions (halo exchange) ----------------------------------------------
Wanted = Callable[[int], Sequence[tuple[int, int]]]


class _Plan:
    """Who sends which positions to whom, computed identically on every rank from the layout."""

    def __init__(self, layout: SequenceLayout, wanted: Wanted, rank: int) -> None:
        self.rank = rank
        # This rank's requests, each a list of owner runs in sequence order.
        self.requests: list[list[Piece]] = [layout.locate(a, b) for a, b in wanted(rank)]
        # Runs this rank owns that another rank asked for: by requester, in (request, run) order,
        # the order in which the requester expects them from this owner.
        self.outgoing: dict[int, list[Piece]] = {}
        for other in range(layout.world):
            if other == rank:
                continue
            runs = [p for a, b in wanted(other) for p in layout.locate(a, b) if p.rank == rank]
            if runs:
                self.outgoing[other] = runs
        self.incoming: dict[int, int] = {}  # owner -> positions to receive from it
        for runs in self.requests:
            for p in runs:
                if p.rank != rank:
                    self.incoming[p.rank] = self.incoming.get(p.rank, 0) + p.length


def _rows(x: Tensor, runs: Sequence[Piece]) -> Tensor:
    """The local rows of ``runs`` (this rank's own) along dim 2, concatenated."""
    return torch.cat([x.narrow(2, p.local, p.length) for p in runs], dim=2)


class _Fetch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, group: Any, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.plan, ctx.group = plan, group
        ctx.shapes = [x.shape for x in xs]
        ctx.meta = [(x.dtype, x.device) for x in xs]
        sends = [(peer, _rows(x, runs)) for peer, runs in plan.outgoing.items() for x in xs]
        bufs = {owner: [x.new_empty(x.shape[0], x.shape[1], n, x.shape[3]) for x in xs]
                for owner, n in plan.incoming.items()}
        exchange(sends, [(owner, b) for owner, bs in bufs.items() for b in bs], group, kind="halo")
        used = dict.fromkeys(bufs, 0)  # rows of each owner's buffer consumed so far
        outs: list[list[Tensor]] = [[] for _ in xs]
        for runs in plan.requests:
            parts: list[list[Tensor]] = [[] for _ in xs]
            for p in runs:
                for i, x in enumerate(xs):
                    src = x.narrow(2, p.local, p.length) if p.rank == plan.rank else \
                        bufs[p.rank][i].narrow(2, used[p.rank], p.length)
                    parts[i].append(src)
                if p.rank != plan.rank:
                    used[p.rank] += p.length
            for i, x in enumerate(xs):
                outs[i].append(torch.cat(parts[i], dim=2) if parts[i] else
                               x.new_empty(x.shape[0], x.shape[1], 0, x.shape[3]))
        flat = [t for per_x in outs for t in per_x]
        ctx.mark_non_differentiable(*[t for t in flat if not t.is_floating_point()])
        return tuple(flat)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        n_req = len(plan.requests)
        need = [i for i, (dt, _) in enumerate(ctx.meta)
                if dt.is_floating_point and ctx.needs_input_grad[2 + i]]
        dxs: list[Tensor | None] = [None] * len(ctx.shapes)
        for i in need:
            dt, dev = ctx.meta[i]
            dxs[i] = torch.zeros(ctx.shapes[i], dtype=dt, device=dev)
        # Gradients of the received rows go back to their owners, in the order they came.
        back: dict[int, list[list[Tensor]]] = {o: [[] for _ in need] for o in plan.incoming}
        for j, runs in enumerate(plan.requests):
            off = 0
            for p in runs:
                for slot, i in enumerate(need):
                    g = grads[i * n_req + j]
                    shape = list(ctx.shapes[i])
                    shape[2] = p.length
                    gp = g.narrow(2, off, p.length) if g is not None else \
                        torch.zeros(shape, dtype=ctx.meta[i][0], device=ctx.meta[i][1])
                    if p.rank == plan.rank:
                        dxs[i].narrow(2, p.local, p.length).add_(gp)  # type: ignore[union-attr]
                    else:
                        back[p.rank][slot].append(gp)
                off += p.length
        sends = [(o, torch.cat(parts, dim=2)) for o, per in back.items() for parts in per]
        bufs = {}
        for peer, runs in plan.outgoing.items():
            n = sum(p.length for p in runs)
            bufs[peer] = []
            for i in need:
                shape = list(ctx.shapes[i])
                shape[2] = n
                bufs[peer].append(torch.empty(shape, dtype=ctx.meta[i][0], device=ctx.meta[i][1]))
        exchange(sends, [(peer, b) for peer, bs in bufs.items() for b in bs], ctx.group, kind="halo")
        for peer, runs in plan.outgoing.items():
            for slot, i in enumerate(need):
                off = 0
                for p in runs:
                    dxs[i].narrow(2, p.local, p.length).add_(bufs[peer][slot].narrow(2, off, p.length))  # type: ignore[union-attr]
                    off += p.length
        return (None, None, *dxs)


def fetch_ranges(xs: Sequence[Tensor], layout: SequenceLayout, wanted: Wanted, group: Any
                 ) -> list[list[Tensor]]:
    """Runs of global positions of sharded tensors, from whichever ranks hold them.

    ``xs``: this rank's shards, each 4-D with the sequence at dim 2 (view a ``(B, L)`` mask as
    ``(B, 1, L, 1)``). ``wanted(r)``: the ``(start, stop)`` runs rank ``r`` asks for, a pure
    function of ``r`` (every rank evaluates it for every rank to know what to send). Returns, per
    tensor, one tensor per run of this rank (``(B, H, stop - start, E)``), differentiable for
    floating tensors: backward returns the gradients to the owners. With runs no longer than a
    chunk next to one's own, only neighbouring ranks talk.
    """
    rank, _ = group_rank_size(group)
    plan = _Plan(layout, wanted, rank)
    if not xs:
        return []
    flat = _Fetch.apply(plan, group, *xs)
    n = len(plan.requests)
    return [list(flat[i * n:(i + 1) * n]) for i in range(len(xs))]
