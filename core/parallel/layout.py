"""How a sequence is split over the P processes of a group (context parallelism).

The layout is load-balanced for causal attention: the sequence of L positions is cut into 2P
chunks ``c = 0 .. 2P-1`` and process ``r`` holds chunk ``r`` followed by its mirror ``2P-1-r``
(the "zigzag" or head-tail layout). Under a causal mask chunk c attends to c + 1 chunks, so every
process gets (r + 1) + (2P - r) = 2P + 1 chunk pairs of work. Every variant uses the same layout,
so one sharded input serves any of them.

Lengths not divisible by 2P: chunk c has ``L // 2P + 1`` positions for ``c < L % 2P`` and
``L // 2P`` after; shards then differ by at most two positions. Every process must hold at least
one position of each of its chunks: ``L >= 2P``. P = 1 is the identity (chunk 0 then chunk 1).

A tensor's shard is its two chunks concatenated along the sequence dim (``shard_tensor``);
``unshard_tensors`` undoes it. ``key_mask (B, L)`` is split the same way along its dim 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["Piece", "SequenceLayout", "shard_tensor", "unshard_tensors"]


@dataclass(frozen=True)
class Piece:
    """A run of global positions ``[start, stop)`` held by ``rank`` at local index ``local``."""

    rank: int
    start: int
    stop: int
    local: int  # where the piece begins in the rank's shard

    @property
    def length(self) -> int:
        """Number of positions."""
        return self.stop - self.start


@dataclass(frozen=True)
class SequenceLayout:
    """The zigzag split of ``length`` positions over ``world`` processes (see module docstring)."""

    length: int
    world: int

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or isinstance(self.world, bool) or self.world < 1:
            raise ValueError(f"world must be an integer >= 1, got {self.world!r}")
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 2 * self.world:
            raise ValueError(
                f"a sequence of length {self.length!r} cannot be split over {self.world} processes: "
                f"the layout cuts it into 2P = {2 * self.world} chunks, each at least 1 position long "
                f"(length >= {2 * self.world})"
            )

    @cached_property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of the 2P chunks, in sequence order."""
        n = 2 * self.world
        base, extra = divmod(self.length, n)
        bounds, start = [], 0
        for c in range(n):
            stop = start + base + (1 if c < extra else 0)
            bounds.append((start, stop))
            start = stop
        return tuple(bounds)

    def pieces(self, rank: int) -> tuple[Piece, Piece]:
        """The two pieces of ``rank``'s shard, in shard order: chunk ``rank``, then ``2P-1-rank``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank!r}")
        (a0, a1), (b0, b1) = self.chunks[rank], self.chunks[2 * self.world - 1 - rank]
        return Piece(rank, a0, a1, 0), Piece(rank, b0, b1, a1 - a0)

    def shard_length(self, rank: int) -> int:
        """Positions held by ``rank``."""
        front, back = self.pieces(rank)
        return front.length + back.length

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """Global positions (int64) of ``rank``'s shard, in shard order (for position ids)."""
        front, back = self.pieces(rank)
        return torch.cat([torch.arange(front.start, front.stop, device=device),
                          torch.arange(back.start, back.stop, device=device)])

    def locate(self, start: int, stop: int) -> list[Piece]:
        """Where the positions ``[start, stop)`` live: one ``Piece`` per owner run, in order
        (``Piece.local`` is the local index of the run's first position on its owner)."""
        if not 0 <= start <= stop <= self.length:
            raise ValueError(f"[{start}, {stop}) is not a range of positions in [0, {self.length})")
        out = []
        for c, (c0, c1) in enumerate(self.chunks):
            lo, hi = max(start, c0), min(stop, c1)
            if lo >= hi:
                continue
            rank = c if c < self.world else 2 * self.world - 1 - c
            front, back = self.pieces(rank)
            piece = front if c < self.world else back
            out.append(Piece(rank, lo, hi, piece.local + lo - c0))
        return out


def _seq_dim(x: Tensor, dim: int | None) -> int:
    if dim is not None:
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim {dim} is out of range for a {x.dim()}-D tensor")
        return dim % x.dim()
    if x.dim() == 4:
        return 2  # (B, H, L, E)
    if x.dim() == 2:
        return 1  # key_mask (B, L)
    raise ValueError(f"cannot tell the sequence dim of a {x.dim()}-D tensor of shape "
                     f"{tuple(x.shape)}: pass dim= (defaults: 2 for (B, H, L, E), 1 for (B, L))")


def shard_tensor(x: Tensor, layout: SequenceLayout, rank: int, dim: int | None = None) -> Tensor:
    """``rank``'s shard of the full tensor ``x``: its two chunks along ``dim`` concatenated.

    ``dim`` defaults to 2 for 4-D ``(B, H, L, E)`` and 1 for 2-D ``(B, L)`` (a key_mask). A fresh
    tensor (no view of ``x``).
    """
    d = _seq_dim(x, dim)
    if x.shape[d] != layout.length:
        raise ValueError(f"x has {x.shape[d]} positions along dim {d}, the layout {layout.length}")
    front, back = layout.pieces(rank)
    return torch.cat([x.narrow(d, front.start, front.length), x.narrow(d, back.start, back.length)], dim=d)


def unshard_tensors(shards: Sequence[Tensor], layout: SequenceLayout, dim: int | None = None) -> Tensor:
    """The full tensor from every rank's shard (``shards[r]`` from rank r), in sequence order."""
    if len(shards) != layout.world:
        raise ValueError(f"expected {layout.world} shards (one per rank), got {len(shards)}")
    d = _seq_dim(shards[0], dim)
    parts: list[Tensor | None] = [None] * (2 * layout.world)
    for r, x in enumerate(shards):
        front, back = layout.pieces(r)
        if x.shape[d] != front.length + back.length:
            raise ValueError(f"shard of rank {r} has {x.shape[d]} positions along dim {d}, the "
                             f"layout gives it {front.length + back.length}")
        parts[r] = x.narrow(d, 0, front.length)
        parts[2 * layout.world - 1 - r] = x.narrow(d, front.length, back.length)
    return torch.cat(parts, dim=d)  # type: ignore[arg-type]
