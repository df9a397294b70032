"""Blocked sliding-window attention over ``F.scaled_dot_product_attention``.

Queries are cut into blocks of ``block`` rows. Block ``b`` can only reach keys
``[b*block - w, b*block + block + w)`` (``+ block`` only when causal), its window of ``span`` keys.
Under lower-right causal alignment query i sits at key position ``i + d`` (``d = Masks.q_offset``,
the decoding / chunked-prefill case): every key window shifts by ``d``, keys before ``d - w`` are
dropped up front, and the block geometry is otherwise the same.

- Interior blocks (window inside ``[0, L)``): keys/values are an overlapping ``unfold`` view folded
  into SDPA's head dim, ``(B*H, n, span, E)``, no copy; ONE SDPA call with ONE shared
  ``(1, 1, block, span)`` band mask keeps SDPA on its fused (flash) CPU kernel.
- The two sequence edges: two small sliced SDPA calls with a rectangular band.
- (batch, block) pairs a shared band cannot serve (padded keys in the window; every pair when an
  ``attn_mask`` is given) are gathered into one more call with their own 4-D
  ``(P, 1|H, block, span)`` mask and written over the interior output.

Band masks are memoised (``MaskCache``): small ones in one process-wide LRU capped at 16 MB, the
big edge masks of wide windows in a cache owned by the calling module (freed with it).

No L x L tensor is ever built (except by ``_dense``, for sequences too short to block). Rows with
nothing to attend are never given to SDPA as empty rows (its result there differs across versions
and kernels): they are opened and their output zeroed, so their gradients are exactly 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import (
    LRUCache,
    Masks,
    and_attn_mask,
    hits_under,
    masked_sdpa,
    poison_rows,
    screen,
    tensor_nbytes,
)

from ._views import views

__all__ = ["MaskCache", "band_mask", "block_band", "clear_mask_cache", "local_attention", "rect_band"]


def band_mask(length: int, window: int, is_causal: bool = False,
              device: torch.device | str | None = None) -> Tensor:
    """Dense ``(L, L)`` bool band: True where ``|i - j| <= window`` (and ``j <= i`` when causal).

    Built in place in one bool tensor: an int64 ``i - j`` matrix would take 8x its memory (16 GiB
    at L = 32768, for the benchmark's dense baseline).
    """
    band = torch.ones(length, length, dtype=torch.bool, device=device)  # (L, L)
    return band.triu_(-window).tril_(0 if is_causal else window)


def rect_band(q_len: int, k_len: int, offset: int, window: int, is_causal: bool,
              device: torch.device | str | None = None) -> Tensor:
    """Band ``(Lq, Lk)`` bool of queries at key positions ``i + offset``: True where
    ``|i + offset - j| <= window`` (and ``j <= i + offset`` when causal). ``offset=0``, Lq = Lk is
    ``band_mask``; ``offset = Lk - Lq`` is the lower-right (decoding) alignment."""
    return _make_rect_band(q_len, k_len, offset, window, is_causal, torch.bool, device)


def block_band(block: int, window: int, is_causal: bool,
               device: torch.device | str | None = None) -> Tensor:
    """The band in block coordinates, ``(block, span)``, shared by every block.

    Row r is query ``b*block + r``; column c is key ``b*block - window + c``; so ``|i - j| <= w``
    becomes ``r <= c <= r + 2w`` and causal ``j <= i`` becomes ``c <= r + w``.
    """
    span = block + window * (1 if is_causal else 2)
    r = torch.arange(block, device=device)[:, None]  # (block, 1)
    c = torch.arange(span, device=device)[None, :]  # (1, span)
    return (c >= r) & (c <= r + (window if is_causal else 2 * window))  # (block, span)


def _dense(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int,
           dropout_p: float, scale: float) -> Tensor:
    """Short inputs (one block, or a window covering the sequence): one SDPA call, Lq x Lk mask."""
    length, d = q.shape[2], masks.q_offset
    if d:  # lower-right causal (decoding): the band is shifted by d
        return _dense_offset(q, k, v, masks, window, dropout_p, scale)
    if masks.attn_mask is None and masks.key_mask is None:
        if window >= length - 1:  # the band is everything: plain (causal) SDPA, no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                  is_causal=masks.is_causal, scale=scale)
        band = band_mask(length, window, masks.is_causal, q.device)  # (L, L); diagonal always in
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout_p, scale=scale)
    band = band_mask(length, window, masks.is_causal, q.device)  # (L, L)
    allowed = masks.allowed(q.device) & band  # (B|1, H|1, L, L)
    return masked_sdpa(q, k, v, allowed, masks.float_mask, dropout_p=dropout_p, scale=scale)


def _dense_offset(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int,
                  dropout_p: float, scale: float) -> Tensor:
    """``_dense`` for queries at key positions ``i + d``, ``0 < d <= window`` (causal, Lk = Lq + d)."""
    lq, lk, d = q.shape[2], k.shape[2], masks.q_offset
    if masks.attn_mask is None and masks.key_mask is None and lq == 1:
        # One query at position d <= window sees keys [0, d]: all of them, no mask (a decode step).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    band = _rect_band(lq, lk, d, window, True, torch.bool, q.device, None)  # (Lq, Lk), memoised
    if masks.attn_mask is None and masks.key_mask is None:  # the diagonal j = i + d is in every row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout_p, scale=scale)
    allowed = masks.allowed(q.device) & band  # (B|1, H|1, Lq, Lk)
    return masked_sdpa(q, k, v, allowed, masks.float_mask, dropout_p=dropout_p, scale=scale)


def _drop_keys(k: Tensor, v: Tensor, masks: Masks, cut: int) -> tuple[Tensor, Tensor, Masks]:
    """Keys/values and masks without the first ``cut`` keys (views): the queries' positions,
    relative to the remaining keys, move ``cut`` to the left."""
    km = None if masks.key_mask is None else masks.key_mask[:, cut:]  # (B, Lk - cut)
    am = masks.attn_mask  # (B|1, H|1, Lq|1, Lk|1)
    if am is not None and am.shape[3] > 1:
        am = am[:, :, :, cut:]
    masks = dataclasses.replace(masks, k_len=masks.k_len - cut, key_mask=km, attn_mask=am,
                                q_offset=masks.q_offset - cut)
    return k[:, :, cut:], v[:, :, cut:], masks  # (B, H, Lk - cut, E|Ev)


def local_attention(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int, block: int,
                    scale: float, dropout_p: float = 0.0, cache: MaskCache | None = None) -> Tensor:
    """Sliding-window softmax attention, ``(B, H, Lq, E) x 3 -> (B, H, Lq, Ev)``; O(Lq*(block+2w)) work.

    Query i sits at key position ``i + masks.q_offset`` (0 unless lower-right causal, Lq < Lk).
    ``cache`` (owned by the calling module) keeps edge masks too big for the process-wide cache.
    """
    if masks.q_offset > window:  # keys before position q_offset - window are in no query's band
        k, v, masks = _drop_keys(k, v, masks, masks.q_offset - window)
    # The band hides keys from some query (from here on q_offset <= window): NaN/inf there must
    # not leak through the kernels' -inf bias and 0 * value, nor spread past the window.
    hides = masks.q_len > 1 if masks.is_causal else masks.k_len - 1 > window
    k, v, bad = screen(k, v, masks, hides)  # bad: (B, H, Lk) positions screened, or None
    out = _local(q, k, v, masks, window, block, scale, dropout_p, cache)  # (B, H, Lq, Ev)
    return poison_rows(out, hits_under(bad, masks, window))  # rows that see a NaN/inf input: NaN


def _local(q: Tensor, k: Tensor, v: Tensor, masks: Masks, window: int, block: int,
           scale: float, dropout_p: float, cache: MaskCache | None) -> Tensor:
    length = q.shape[2]
    right = 0 if masks.is_causal else window
    # Blocks with their whole window inside the keys (q_offset <= window from here on).
    interior = (length - right) // block - -(-(window - masks.q_offset) // block)
    if interior < 1 or block + window + right >= length:  # blocking cannot beat one dense call here
        return _dense(q, k, v, masks, window, dropout_p, scale)
    return _blocked(q, k, v, masks, window, block, scale, dropout_p, cache)


class MaskCache(LRUCache[Tensor]):
    """A small LRU of band masks: at most ``entries`` tensors of at most ``max_elements`` each.

    Rebuilding a mask every call costs more than the attention it serves on a busy CPU (fresh
    multi-MB tensors mean page faults). One process-wide instance keeps only small masks (the
    shared block band, short edges); each ``LocalAttention`` owns another for the big edge masks
    of wide windows, freed with the module. Copies/pickles of the owner start empty.
    """

    def __init__(self, entries: int, max_elements: int) -> None:
        super().__init__(entries, nbytes_of=tensor_nbytes)
        self.max_elements = max_elements

    def __reduce__(self) -> tuple[type[MaskCache], tuple[int, int]]:  # type: ignore[override]
        return (MaskCache, (self.entries, self.max_elements))  # cached tensors (and lock) are not state

    def get(self, numel: int, key: tuple[object, ...], build: Callable[[], Tensor]) -> Tensor | None:
        """The mask under ``key`` (built and kept if missing); None if ``numel`` is over the cap.
        Callers must not modify the returned tensor in place."""
        if numel > self.max_elements:
            return None
        return self.get_or_build(key, build)


# Process-wide: 32 masks of at most 64K elements (256 KB in float32): under 16 MB in any dtype.
_SHARED = MaskCache(32, 1 << 16)


def clear_mask_cache() -> None:
    """Free the process-wide memoised band masks (they are rebuilt on demand)."""
    _SHARED.clear()


def _cached(numel: int, key: tuple[object, ...], build: Callable[[], Tensor],
            owned: MaskCache | None = None) -> Tensor:
    """``build()``, memoised in the shared cache if small, else in ``owned`` if given and it fits."""
    for cache in (_SHARED, owned):
        if cache is not None:
            hit = cache.get(numel, key, build)
            if hit is not None:
                return hit
    return build()


def _band_bias(block: int, window: int, is_causal: bool, dtype: torch.dtype, device: torch.device,
               owned: MaskCache | None) -> Tensor:
    """``block_band`` as SDPA's additive mask ``(1, 1, block, span)`` (0 / -inf), shared by every block."""

    def build() -> Tensor:
        band = block_band(block, window, is_causal, device)  # (block, span)
        bias = torch.zeros(band.shape, dtype=dtype, device=device).masked_fill_(~band, float("-inf"))
        return bias[None, None]  # (1, 1, block, span)

    span = block + window * (1 if is_causal else 2)
    return _cached(block * span, ("band", block, window, is_causal, dtype, str(device)), build, owned)


def _rect_band(rows: int, cols: int, offset: int, window: int, is_causal: bool, dtype: torch.dtype,
               device: torch.device, owned: MaskCache | None) -> Tensor:
    """Band of queries ``offset + r`` against keys ``c`` (``(rows, cols)``): bool, or SDPA's 0/-inf bias.

    Memoised: small ones process-wide, big ones in the calling module's ``owned`` cache.
    """
    key = ("rect", rows, cols, offset, window, is_causal, dtype, str(device))
    return _cached(rows * cols, key,
                   lambda: _make_rect_band(rows, cols, offset, window, is_causal, dtype, device), owned)


def _make_rect_band(rows: int, cols: int, offset: int, window: int, is_causal: bool,
                    dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    i = torch.arange(rows, device=device)[:, None] + offset  # (rows, 1)
    j = torch.arange(cols, device=device)[None, :]  # (1, cols)
    allowed = (i - j).abs() <= window  # (rows, cols)
    if is_causal:
        allowed = allowed & (j <= i)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _blocked(q: Tensor, k: Tensor, v: Tensor, masks: Masks, w: int, blk: int,
             scale: float, dropout_p: float, cache: MaskCache | None) -> Tensor:
    b_, h_, length, e_ = q.shape
    k_len, d = k.shape[2], masks.q_offset  # query i is key position i + d (0 <= d <= w), Lk = Lq + d
    ev = v.shape[-1]
    right = 0 if masks.is_causal else w  # keys a block may see beyond its own rows
    span = blk + w + right
    lo = -(-(w - d) // blk)  # first block whose window starts at a key >= 0
    hi = (length - right) // blk  # blocks [lo, hi) are "interior": whole window inside [0, Lk)
    n = hi - lo
    s0 = lo * blk + d - w  # first key of block lo's window
    # Pure views (no copies): interior query blocks, their overlapping key/value windows, and the
    # rows of the two edges; one gradient buffer per input in backward (see _views).
    left = (0, lo * blk), (0, min(k_len, lo * blk + d + right))  # edge queries [0, lo*blk), their keys
    right_edge = (hi * blk, length), (hi * blk + d - w, k_len)  # edge queries [hi*blk, Lq), their keys
    edge_q = ("rows", *left[0]), ("rows", *right_edge[0])
    edge_k = ("rows", *left[1]), ("rows", *right_edge[1])
    q_run, q_left, q_right = views(q, ("blocks", lo * blk, n, blk), *edge_q)  # (B*H, n, blk, E), edges
    k_run, k_left, k_right = views(k, ("windows", s0, n, span, blk), *edge_k)  # (B*H, n, span, E), edges
    v_run, v_left, v_right = views(v, ("windows", s0, n, span, blk), *edge_k)

    # Interior (batch, block) pairs that a shared band cannot serve: padded keys in the window, or an
    # attn_mask (it differs per block). They get their own 4-D mask in a second call.
    dirty = empty = None  # (B, n) bool
    kmw = None
    if masks.key_mask is not None:
        kmw = masks.key_mask.narrow(1, s0, (n - 1) * blk + span).unfold(1, span, blk)  # (B, n, span)
        dirty, empty = ~kmw.all(-1), ~kmw.any(-1)
    if masks.attn_mask is not None:
        dirty = torch.ones(b_, n, dtype=torch.bool, device=q.device)
        empty = empty if empty is not None else torch.zeros_like(dirty)

    if q.device.type == "meta":  # no values: the per-pair pass below rewrites values, not shapes
        dirty = None
    if dirty is not None and bool(dirty.all()):
        main = q.new_zeros(b_, h_, n * blk, ev)  # every pair is recomputed below
    else:
        main = F.scaled_dot_product_attention(
            q_run, k_run, v_run,  # (B*H, n, blk|span, E): blocks folded into SDPA's head dim
            attn_mask=_band_bias(blk, w, masks.is_causal, q.dtype, q.device, cache),
            dropout_p=dropout_p, scale=scale,
        ).reshape(b_, h_, n * blk, ev)  # (B, H, n*blk, Ev)

    pieces = [main]
    if lo > 0:
        pieces.insert(0, _edge(q_left, k_left, v_left, masks, *left, w, scale, dropout_p, cache))
    if hi * blk < length:
        pieces.append(_edge(q_right, k_right, v_right, masks, *right_edge, w, scale,
                            dropout_p, cache))
    out = torch.cat(pieces, dim=2)  # (B, H, L, Ev); a fresh tensor, safe to write into below

    if dirty is not None:
        inner = out.narrow(2, lo * blk, n * blk).view(b_, h_, n, blk, ev).transpose(1, 2)  # (B,n,H,blk,Ev)
        bi, bk = (dirty & ~empty).nonzero(as_tuple=True)  # (P,), (P,)
        if bi.numel():
            allowed = block_band(blk, w, masks.is_causal, q.device)[None, None]  # (1, 1, blk, span)
            if kmw is not None:
                allowed = allowed & kmw[bi, bk][:, None, None, :]  # (P, 1, blk, span)
            bias = None
            if masks.attn_mask is not None:
                rows = (lo + bk[:, None]) * blk + torch.arange(blk, device=q.device)  # (P, blk): query i
                # key j of window column c: first query row of the block + d - w + c
                cols = (lo + bk[:, None]) * blk + (d - w) + torch.arange(span, device=q.device)  # (P, span)
                am = _gather_blocks(masks.attn_mask, bi, rows, cols)  # (P, H|1, blk, span)
                allowed, bias = and_attn_mask(allowed, am)
            inner.index_put_((bi, bk), masked_sdpa(
                q_run.view(b_, h_, n, blk, e_)[bi, :, bk],  # (P, H, blk, E) gathered copies
                k_run.view(b_, h_, n, span, e_)[bi, :, bk],  # (P, H, span, E)
                v_run.view(b_, h_, n, span, ev)[bi, :, bk],
                allowed, bias, dropout_p=dropout_p, scale=scale,
            ))
        zi, zk = empty.nonzero(as_tuple=True)  # pairs with no real key: output 0
        if zi.numel():
            inner.index_put_((zi, zk), out.new_zeros(()))
    return out


def _edge(qs: Tensor, ks: Tensor, vs: Tensor, masks: Masks, rows: tuple[int, int], cols: tuple[int, int],
          w: int, scale: float, dropout_p: float, cache: MaskCache | None) -> Tensor:
    """Query rows ``rows`` (``qs``) against key rows ``cols`` (``ks``, ``vs``), small, at a sequence end,
    with a dense rectangular band."""
    (i0, i1), (j0, j1) = rows, cols
    q = qs
    offset = i0 + masks.q_offset - j0  # key column of query row 0
    if masks.key_mask is None and masks.attn_mask is None:  # key i + d is in cols: no row is empty
        bias = _rect_band(i1 - i0, j1 - j0, offset, w, masks.is_causal, q.dtype, q.device, cache)  # (li, lj)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    allowed = _rect_band(i1 - i0, j1 - j0, offset, w, masks.is_causal, torch.bool, q.device,
                         cache)[None, None]
    if masks.key_mask is not None:
        allowed = allowed & masks.key_mask[:, None, None, j0:j1]  # (B, 1, li, lj)
    bias = None
    if masks.attn_mask is not None:
        m = masks.attn_mask  # (B|1, H|1, L|1, L|1)
        full = slice(None)  # size-1 (broadcast) dims are kept whole
        m = m[:, :, slice(i0, i1) if m.shape[2] > 1 else full, slice(j0, j1) if m.shape[3] > 1 else full]
        allowed, bias = and_attn_mask(allowed, m)
    return masked_sdpa(qs, ks, vs, allowed, bias, dropout_p=dropout_p, scale=scale)


def _gather_blocks(mask: Tensor, bi: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The ``(P, H|1, blk, span)`` pieces of a 4-D (broadcast) mask at query ``rows`` (P, blk) and
    key ``cols`` (P, span) of batch items ``bi`` (P,)."""
    mb, _, mq, mk = mask.shape  # (B|1, H|1, L|1, L|1)
    rows = rows if mq > 1 else torch.zeros_like(rows)
    cols = cols if mk > 1 else torch.zeros_like(cols)
    batch = bi if mb > 1 else torch.zeros_like(bi)
    picked = mask.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # (P, H|1, blk, span)
