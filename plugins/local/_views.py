"""Several (possibly overlapping) views of one ``(B, H, L, E)`` tensor with ONE gradient buffer.

Slicing a tensor in several places and unfolding it into overlapping windows is free in the forward
pass, but autograd's backward of each slice / unfold allocates and zero-fills a full ``(B, H, L, E)``
gradient and sums them all afterwards; ``unfold``'s generic backward is also slow on the
``(B*H, n, span, E)`` window gradients SDPA returns. ``views`` does the same forward (pure views,
no copies) and a backward that accumulates every piece in place into one buffer, folding the
windows back with ``ceil(span / block)`` strided adds.

A view is described by a recipe: ``Rows``, ``Blocks`` or ``Windows``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Blocks", "Recipe", "Rows", "Windows", "views"]


class Rows(NamedTuple):
    """``x[:, :, start:stop]``, (B, H, stop - start, E)."""

    start: int
    stop: int

    def view(self, x: Tensor) -> Tensor:
        """The view of a contiguous ``x`` (B, H, L, E)."""
        return x[:, :, self.start:self.stop]  # (B, H, stop - start, E)

    def rows_needed(self) -> int:
        """Rows of the gradient buffer this recipe writes (``accumulate``)."""
        return self.stop

    def accumulate(self, gx: Tensor, g: Tensor) -> None:
        """Add the gradient ``g`` of the view into ``gx`` (B*H, rows, E)."""
        gx[:, self.start:self.stop] += g.reshape(gx.shape[0], self.stop - self.start, gx.shape[2])


class Blocks(NamedTuple):
    """Rows ``start .. start + n*blk`` as ``n`` blocks of ``blk`` rows, (B*H, n, blk, E)."""

    start: int
    n: int
    blk: int

    def view(self, x: Tensor) -> Tensor:
        """The view of a contiguous ``x`` (B, H, L, E)."""
        b, h, _, e = x.shape
        return x.narrow(2, self.start, self.n * self.blk).reshape(b * h, self.n, self.blk, e)  # view

    def rows_needed(self) -> int:
        """Rows of the gradient buffer this recipe writes (``accumulate``)."""
        return self.start + self.n * self.blk

    def accumulate(self, gx: Tensor, g: Tensor) -> None:
        """Add the gradient ``g`` of the view into ``gx`` (B*H, rows, E)."""
        rows = self.n * self.blk
        gx[:, self.start:self.start + rows] += g.reshape(gx.shape[0], rows, gx.shape[2])


class Windows(NamedTuple):
    """``n`` overlapping windows of ``span`` rows, window i starting at row ``start + i*blk``,
    (B*H, n, span, E)."""

    start: int
    n: int
    span: int
    blk: int

    @property
    def chunks(self) -> int:
        """Blocks of ``blk`` rows a window covers (the last one may be partial)."""
        return -(-self.span // self.blk)

    def view(self, x: Tensor) -> Tensor:
        """The view of a contiguous ``x`` (B, H, L, E)."""
        b, h, _, e = x.shape
        run = x.narrow(2, self.start, (self.n - 1) * self.blk + self.span)  # (B, H, covered, E)
        return run.unfold(2, self.span, self.blk).transpose(-1, -2).reshape(b * h, self.n, self.span, e)

    def rows_needed(self) -> int:
        """Rows of the gradient buffer this recipe writes: whole blocks, past L at the end."""
        return self.start + (self.n + self.chunks - 1) * self.blk

    def accumulate(self, gx: Tensor, g: Tensor) -> None:
        """Fold the window gradients ``g`` (B*H, n, span, E) back into ``gx`` (B*H, rows, E)."""
        n, blk = self.n, self.blk
        region = gx[:, self.start:self.rows_needed()].view(gx.shape[0], n + self.chunks - 1, blk, gx.shape[2])
        for t in range(self.chunks):  # window position t*blk + c of block i is row (i + t)*blk + c
            width = min(blk, self.span - t * blk)
            region[:, t:t + n, :width] += g[:, :, t * blk:t * blk + width]


Recipe = Rows | Blocks | Windows


class _Views(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, recipes: tuple[Recipe, ...]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.shape, ctx.recipes = x.shape, recipes
        x = x.contiguous()  # so that (B, H) folds into one dim as a view
        return tuple(r.view(x) for r in recipes)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        b, h, length, e = ctx.shape
        # Room past L so that every window chunk is a whole block (the tail is dropped).
        rows = max([length] + [r.rows_needed() for r in ctx.recipes])
        ref = next(g for g in grads if g is not None)
        gx = ref.new_zeros(b * h, rows, e)  # (B*H, L + extra, E)
        for g, r in zip(grads, ctx.recipes, strict=True):
            if g is not None:
                r.accumulate(gx, g)
        return gx[:, :length].view(b, h, length, e), None  # splitting dim 0 is a view even when extra > 0


def views(x: Tensor, *recipes: Recipe) -> tuple[Tensor, ...]:
    """The views of ``x`` (B, H, L, E) described by ``recipes`` (see the module docstring)."""
    return _Views.apply(x, tuple(recipes))
