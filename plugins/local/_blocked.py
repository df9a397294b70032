"""Blocked sliding-window attention over ``F.scaled_dot_product_attention``.

Queries are cut into blocks of ``block`` rows. Block ``b`` can only reach keys
``[b*block - w, b*block + block + w)`` (``+ block`` only, when causal), so its keys and values are a
strided ``unfold`` view of the zero-padded sequence, folded into SDPA's head dim: no L x L tensor is
ever built. Every block with nothing but real keys in its window ("clean") goes through ONE SDPA call
with ONE shared ``(1, 1, block, span)`` band mask, which keeps SDPA on its fused (flash) CPU kernel.
The few other (batch, block) pairs -- sequence edges, padded keys, or every block when an
``attn_mask`` is given -- are gathered into a second call with their own 4-D ``(P, H|1, block, span)``
mask, and their outputs replace the clean call's ones.

Rows with nothing to attend are never given to SDPA as empty rows (its result there differs across
versions and kernels): they are opened and their output is zeroed afterwards, so gradients stay 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import Masks

__all__ = ["band_mask", "block_band", "local_attention"]


def band_mask(length: int, window: int, is_causal: bool = False, device=None) -> Tensor:
    """Dense ``(L, L)`` bool band: True where ``|i - j| <= window`` (and ``j <= i`` when causal)."""
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]  # (L, L): i - j
    allowed = diff.abs() <= window
    return allowed & (diff >= 0) if is_causal else allowed


def block_band(block: int, window: int, is_causal: bool, device=None) -> Tensor:
    """The band in block coordinates, ``(block, span)``, shared by every block.

    Row r is query ``b*block + r``; column c is key ``b*block - window + c``; so ``|i - j| <= w``
    becomes ``r <= c <= r + 2w`` and causal ``j <= i`` becomes ``c <= r + w``.
    """
    span = block + window * (1 if is_causal else 2)
    r = torch.arange(block, device=device)[:, None]  # (block, 1)
    c = torch.arange(span, device=device)[None, :]  # (1, span)
    return (c >= r) & (c <= r + (window if is_causal else 2 * window))  # (block, span)


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None,
                 dropout_p: float, scale: float) -> Tensor:
    """SDPA under a bool ``allowed`` mask (and optional additive ``bias``), empty rows -> 0."""
    dead = ~allowed.any(dim=-1, keepdim=True)  # (N|1, H|1, Lq, 1)
    has_dead = bool(dead.any())
    if bias is None:
        mask = allowed | dead if has_dead else allowed  # open empty rows; zeroed below
    else:
        mask = bias.masked_fill(~allowed, float("-inf"))
        if has_dead:
            mask = mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(dead, 0.0) if has_dead else out


def _dense(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int,
           dropout_p: float, scale: float) -> Tensor:
    """Short sequences (one block, or a window covering the sequence): one SDPA call, L x L mask."""
    length = q.shape[2]
    if masks.attn_mask is None and masks.key_mask is None:
        if window >= length - 1:  # the band is everything: plain (causal) SDPA, no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                  is_causal=masks.is_causal, scale=scale)
        band = band_mask(length, window, masks.is_causal, q.device)  # (L, L); diagonal always in
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout_p, scale=scale)
    band = band_mask(length, window, masks.is_causal, q.device)  # (L, L)
    allowed = masks.allowed(q.device) & band  # (B|1, H|1, L, L)
    return _sdpa_masked(q, k, v, allowed, masks.float_mask, dropout_p, scale)


def local_attention(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int, block: int,
                    scale: float, dropout_p: float = 0.0) -> Tensor:
    """Sliding-window softmax attention, ``(B, H, L, E) x 3 -> (B, H, L, Ev)``; O(L*(block+2w)) work."""
    length = q.shape[2]
    span = block + window * (1 if masks.is_causal else 2)
    if length <= block or span >= length:  # blocking cannot beat one dense call here
        return _dense(q, k, v, masks, window, dropout_p, scale)
    return _blocked(q, k, v, masks, window, block, scale, dropout_p)


def _blocked(q: Tensor, k: Tensor, v: Tensor, masks: Masks, w: int, blk: int,
             scale: float, dropout_p: float) -> Tensor:
    b_, h_, length, e_ = q.shape
    ev = v.shape[-1]
    causal = masks.is_causal
    dev = q.device
    nb = -(-length // blk)  # number of query blocks
    lq = nb * blk  # padded query length
    right = 0 if causal else w  # keys a block may see beyond its own rows
    span = blk + w + right
    qp = F.pad(q, (0, 0, 0, lq - length))  # (B, H, Lq, E)
    kp = F.pad(k, (0, 0, w, lq - length + right))  # (B, H, Lq + w + right, E); zeros are masked below
    vp = F.pad(v, (0, 0, w, lq - length + right))  # (B, H, Lq + w + right, Ev)
    kwin = kp.unfold(2, span, blk).transpose(-1, -2)  # (B, H, nb, span, E): overlapping view, no copy
    vwin = vp.unfold(2, span, blk).transpose(-1, -2)  # (B, H, nb, span, Ev)
    band = block_band(blk, w, causal, dev)  # (blk, span)

    # Which keys are real, in padded coordinates; and which (batch, block) pairs see a non-real one.
    pos = torch.arange(lq + w + right, device=dev) - w  # (Lk_pad,): key index j
    valid = ((pos >= 0) & (pos < length))[None]  # (1, Lk_pad)
    if masks.key_mask is not None:
        valid = valid & F.pad(masks.key_mask, (w, lq - length + right))  # (B, Lk_pad)
    # A causal block's keys past L are only reachable by its padding rows: they do not make it dirty.
    reach = valid | (pos >= length) if causal else valid  # (B|1, Lk_pad)
    valid_win = valid.unfold(-1, span, blk)  # (B|1, nb, span)
    dirty = (~reach.unfold(-1, span, blk)).any(-1).expand(b_, nb)  # (B, nb)
    if masks.attn_mask is not None:  # a dense mask differs per block: no block can share the band
        dirty = torch.ones(b_, nb, dtype=torch.bool, device=dev)
    empty = (~valid_win.any(-1)).expand(b_, nb)  # (B, nb): no real key at all -> output 0
    fix = dirty & ~empty  # (B, nb): pairs computed with their own mask
    clean_cols = (~dirty).any(0).nonzero().flatten()  # blocks clean in at least one batch item

    if clean_cols.numel():
        lo, hi = int(clean_cols[0]), int(clean_cols[-1]) + 1
        main = F.scaled_dot_product_attention(
            qp.reshape(b_ * h_, nb, blk, e_)[:, lo:hi],
            kwin.reshape(b_ * h_, nb, span, e_)[:, lo:hi],
            vwin.reshape(b_ * h_, nb, span, ev)[:, lo:hi],
            attn_mask=band[None, None], dropout_p=dropout_p, scale=scale,
        )  # (B*H, hi-lo, blk, Ev)
        out = F.pad(main.reshape(b_, h_, hi - lo, blk, ev), (0, 0, 0, 0, lo, nb - hi))  # (B, H, nb, blk, Ev)
        in_main = torch.zeros(nb, dtype=torch.bool, device=dev)
        in_main[lo:hi] = True
        zero = empty & in_main  # (B, nb): empty pairs the clean call gave a (wrong) non-zero output
    else:
        out = qp.new_zeros(b_, h_, nb, blk, ev)  # (B, H, nb, blk, Ev)
        zero = torch.zeros_like(dirty)

    bi, bk = fix.nonzero(as_tuple=True)  # (P,), (P,)
    zi, zk = zero.nonzero(as_tuple=True)  # (Z,), (Z,)
    if bi.numel() == 0 and zi.numel() == 0:
        return out.reshape(b_, h_, lq, ev)[:, :, :length]
    pieces = []
    if bi.numel():
        qf = qp.reshape(b_, h_, nb, blk, e_)[bi, :, bk]  # (P, H, blk, E)
        kf = kwin[bi, :, bk]  # (P, H, span, E)
        vf = vwin[bi, :, bk]  # (P, H, span, Ev)
        vb = bi if valid_win.shape[0] > 1 else torch.zeros_like(bi)
        allowed = band[None, None] & valid_win[vb, bk][:, None, None, :]  # (P, 1, blk, span)
        bias = None
        if masks.attn_mask is not None:
            am = _gather_blocks(masks.attn_mask, bi, bk, blk, w, span, length)  # (P, H|1, blk, span)
            if am.dtype == torch.bool:
                allowed = allowed & am
            else:
                allowed, bias = allowed & (am != float("-inf")), am
        pieces.append(_sdpa_masked(qf, kf, vf, allowed, bias, dropout_p, scale))  # (P, H, blk, Ev)
    if zi.numel():
        pieces.append(out.new_zeros(zi.numel(), h_, blk, ev))
        bi, bk = torch.cat([bi, zi]), torch.cat([bk, zk])
    fixed = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (P + Z, H, blk, Ev)
    out = out.transpose(1, 2).index_put((bi, bk), fixed).transpose(1, 2)  # (B, H, nb, blk, Ev)
    return out.reshape(b_, h_, lq, ev)[:, :, :length]


def _gather_blocks(mask: Tensor, bi: Tensor, bk: Tensor, blk: int, w: int, span: int,
                   length: int) -> Tensor:
    """The ``(P, H|1, blk, span)`` pieces of a 4-D (broadcast) mask seen by pairs (bi, bk).

    Indices outside ``[0, L)`` are clamped; those rows / keys are masked or discarded elsewhere.
    """
    mb, _, mq, mk = mask.shape  # (B|1, H|1, L|1, L|1)
    dev = mask.device
    rows = bk[:, None] * blk + torch.arange(blk, device=dev)  # (P, blk): query index i
    cols = bk[:, None] * blk - w + torch.arange(span, device=dev)  # (P, span): key index j
    rows = rows.clamp(max=length - 1) if mq > 1 else torch.zeros_like(rows)
    cols = cols.clamp(0, length - 1) if mk > 1 else torch.zeros_like(cols)
    batch = bi if mb > 1 else torch.zeros_like(bi)
    picked = mask.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # (P, H|1, blk, span)
