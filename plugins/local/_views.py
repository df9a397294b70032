"""Several (possibly overlapping) views of one ``(B, H, L, E)`` tensor with ONE gradient buffer.

Slicing a tensor in several places and unfolding it into overlapping windows is free in the forward
pass, but autograd's backward of each slice / unfold allocates and zero-fills a full ``(B, H, L, E)``
gradient and sums them all afterwards; ``unfold``'s generic backward is also slow on the
``(B*H, n, span, E)`` window gradients SDPA returns. ``views`` does the same forward (pure views,
no copies) and a backward that accumulates every piece in place into one buffer, folding the
windows back with ``ceil(span / block)`` strided adds.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["views"]

# A recipe is ("rows", start, stop)            -> x[:, :, start:stop]                   (B, H, stop-start, E)
#             ("blocks", start, n, blk)        -> rows start .. start+n*blk as blocks  (B*H, n, blk, E)
#             ("windows", start, n, span, blk) -> window b: rows start+b*blk .. +span  (B*H, n, span, E)
Recipe = tuple


def _view(x: Tensor, r: Recipe) -> Tensor:
    b, h, _, e = x.shape
    if r[0] == "rows":
        return x[:, :, r[1]:r[2]]  # (B, H, stop - start, E)
    if r[0] == "blocks":
        _, start, n, blk = r
        return x.narrow(2, start, n * blk).reshape(b * h, n, blk, e)  # (B*H, n, blk, E) view
    _, start, n, span, blk = r
    run = x.narrow(2, start, (n - 1) * blk + span)  # (B, H, covered, E)
    return run.unfold(2, span, blk).transpose(-1, -2).reshape(b * h, n, span, e)  # overlapping view


class _Views(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, recipes: tuple[Recipe, ...]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.shape, ctx.recipes = x.shape, recipes
        x = x.contiguous()  # so that (B, H) folds into one dim as a view
        return tuple(_view(x, r) for r in recipes)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        b, h, length, e = ctx.shape
        # Room past L so that every window chunk below is a whole block (the tail is dropped).
        extra = max([0] + [r[1] + (r[2] + -(-r[3] // r[4]) - 1) * r[4] - length
                           for r in ctx.recipes if r[0] == "windows"])
        ref = next(g for g in grads if g is not None)
        gx = ref.new_zeros(b * h, length + extra, e)  # (B*H, L + extra, E)
        for g, r in zip(grads, ctx.recipes, strict=True):
            if g is None:
                continue
            if r[0] == "rows":
                gx[:, r[1]:r[2]] += g.reshape(b * h, r[2] - r[1], e)
            elif r[0] == "blocks":
                gx[:, r[1]:r[1] + r[2] * r[3]] += g.reshape(b * h, r[2] * r[3], e)
            else:
                _, start, n, span, blk = r
                chunks = -(-span // blk)
                region = gx[:, start:start + (n + chunks - 1) * blk].view(b * h, n + chunks - 1, blk, e)
                for t in range(chunks):  # window position t*blk + c of block i is row (i + t)*blk + c
                    width = min(blk, span - t * blk)
                    region[:, t:t + n, :width] += g[:, :, t * blk:t * blk + width]
        return gx[:, :length].view(b, h, length, e), None  # splitting dim 0 is a view even when extra > 0


def views(x: Tensor, *recipes: Recipe) -> tuple[Tensor, ...]:
    """The views of ``x`` (B, H, L, E) described by ``recipes`` (see the module docstring)."""
    return _Views.apply(x, tuple(recipes))
