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

Band masks (built in ``_bands``) are memoised (``MaskCache``): small ones in one process-wide
LRU capped at 16 MB, the big edge masks of wide windows in a cache owned by the calling module
(freed with it).

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

from ._bands import band_mask, block_band, make_rect_band, rect_band
from ._views import Blocks, Rows, Windows, views

__all__ = ["MaskCache", "band_mask", "block_band", "clear_mask_cache", "local_attention", "rect_band"]


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
                   lambda: make_rect_band(rows, cols, offset, window, is_causal, dtype, device), owned)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where the blocks of one blocked call lie. Query i is key position ``i + d``
    (``0 <= d <= w``, ``Lk = Lq + d``); blocks ``[lo, hi)`` are interior: their whole window of
    ``span`` keys, starting at key ``s0`` for block ``lo``, lies inside ``[0, Lk)``."""

    blk: int
    w: int
    d: int
    right: int  # keys a block may see beyond its own rows: w, or 0 when causal
    q_len: int
    k_len: int

    @classmethod
    def of(cls, q: Tensor, k: Tensor, masks: Masks, w: int, blk: int) -> _Geometry:
        """The geometry of queries ``q`` (B, H, Lq, E) against keys ``k`` (B, H, Lk, E)."""
        return cls(blk, w, masks.q_offset, 0 if masks.is_causal else w, q.shape[2], k.shape[2])

    @property
    def span(self) -> int:
        """Keys in one block's window."""
        return self.blk + self.w + self.right

    @property
    def lo(self) -> int:
        """First block whose window starts at a key >= 0."""
        return -(-(self.w - self.d) // self.blk)

    @property
    def hi(self) -> int:
        """One past the last block whose window ends inside the keys."""
        return (self.q_len - self.right) // self.blk

    @property
    def n(self) -> int:
        """Interior blocks."""
        return self.hi - self.lo

    @property
    def s0(self) -> int:
        """First key of block ``lo``'s window."""
        return self.lo * self.blk + self.d - self.w

    def edges(self) -> tuple[tuple[Rows, Rows], tuple[Rows, Rows]]:
        """(query rows, their key rows) of the left edge ``[0, lo*blk)`` and of the right edge
        ``[hi*blk, Lq)``."""
        lo, hi, d = self.lo * self.blk, self.hi * self.blk, self.d
        left = Rows(0, lo), Rows(0, min(self.k_len, lo + d + self.right))
        right = Rows(hi, self.q_len), Rows(hi + d - self.w, self.k_len)
        return left, right


def _blocked(q: Tensor, k: Tensor, v: Tensor, masks: Masks, w: int, blk: int,
             scale: float, dropout_p: float, cache: MaskCache | None) -> Tensor:
    """``_local`` on the blocked path: the interior blocks in one SDPA call under a shared band,
    the two edges densely, then the (batch, block) pairs the shared band cannot serve again."""
    geo = _Geometry.of(q, k, masks, w, blk)
    (left_q, left_k), (right_q, right_k) = geo.edges()
    # Pure views (no copies): interior query blocks, their overlapping key/value windows, and the
    # rows of the two edges; one gradient buffer per input in backward (see _views).
    windows = Windows(geo.s0, geo.n, geo.span, blk)
    q_run, q_left, q_right = views(q, Blocks(geo.lo * blk, geo.n, blk), left_q, right_q)  # (B*H, n, blk, E)
    k_run, k_left, k_right = views(k, windows, left_k, right_k)  # (B*H, n, span, E), edges
    v_run, v_left, v_right = views(v, windows, left_k, right_k)
    pairs = _irregular_pairs(masks, geo, q.shape[0], q.device)
    main = _interior(q_run, k_run, v_run, masks, geo, pairs, scale, dropout_p, cache)  # (B, H, n*blk, Ev)
    pieces = [main]
    if geo.lo > 0:
        pieces.insert(0, _edge(q_left, k_left, v_left, masks, left_q, left_k, w, scale, dropout_p, cache))
    if geo.hi * blk < geo.q_len:
        pieces.append(_edge(q_right, k_right, v_right, masks, right_q, right_k, w, scale, dropout_p, cache))
    out = torch.cat(pieces, dim=2)  # (B, H, L, Ev); a fresh tensor, safe to write into below
    if pairs is not None:
        _redo_pairs(out, q_run, k_run, v_run, masks, geo, pairs, scale, dropout_p)
    return out


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """Interior (batch, block) pairs that the shared band cannot serve (``dirty``: padded keys in
    the window, or an attn_mask, which differs per block), those with no real key at all
    (``empty``), both (B, n) bool, and the key_mask of every window (B, n, span) or None."""

    dirty: Tensor
    empty: Tensor
    key_windows: Tensor | None


def _irregular_pairs(masks: Masks, geo: _Geometry, batch: int, device: torch.device) -> _Pairs | None:
    """The pairs to redo with their own mask (see ``_Pairs``); None when the band serves all (or
    on meta, which has no values: the redo rewrites values, not shapes)."""
    if device.type == "meta" or (masks.key_mask is None and masks.attn_mask is None):
        return None
    dirty = empty = kmw = None
    if masks.key_mask is not None:
        covered = (geo.n - 1) * geo.blk + geo.span
        kmw = masks.key_mask.narrow(1, geo.s0, covered).unfold(1, geo.span, geo.blk)  # (B, n, span)
        dirty, empty = ~kmw.all(-1), ~kmw.any(-1)
    if masks.attn_mask is not None:
        dirty = torch.ones(batch, geo.n, dtype=torch.bool, device=device)
        empty = empty if empty is not None else torch.zeros_like(dirty)
    assert dirty is not None and empty is not None
    return _Pairs(dirty, empty, kmw)


def _interior(q_run: Tensor, k_run: Tensor, v_run: Tensor, masks: Masks, geo: _Geometry,
              pairs: _Pairs | None, scale: float, dropout_p: float, cache: MaskCache | None) -> Tensor:
    """Every interior block in ONE SDPA call under the shared band: blocks folded into SDPA's head
    dim, (B*H, n, blk|span, E) -> (B, H, n*blk, Ev); zeros when every pair is redone anyway."""
    b, h = masks.batch, masks.heads
    ev = v_run.shape[-1]
    if pairs is not None and bool(pairs.dirty.all()):
        return q_run.new_zeros(b, h, geo.n * geo.blk, ev)  # every pair is recomputed in _redo_pairs
    return F.scaled_dot_product_attention(
        q_run, k_run, v_run,
        attn_mask=_band_bias(geo.blk, geo.w, masks.is_causal, q_run.dtype, q_run.device, cache),
        dropout_p=dropout_p, scale=scale,
    ).reshape(b, h, geo.n * geo.blk, ev)  # (B, H, n*blk, Ev)


def _redo_pairs(out: Tensor, q_run: Tensor, k_run: Tensor, v_run: Tensor, masks: Masks, geo: _Geometry,
                pairs: _Pairs, scale: float, dropout_p: float) -> None:
    """Overwrite, in ``out`` (B, H, L, Ev), the irregular pairs with one SDPA call under their own
    4-D ``(P, 1|H, blk, span)`` mask, and the pairs with no real key with 0."""
    b, h, blk, span, n = masks.batch, masks.heads, geo.blk, geo.span, geo.n
    e, ev = q_run.shape[-1], v_run.shape[-1]
    inner = out.narrow(2, geo.lo * blk, n * blk).view(b, h, n, blk, ev).transpose(1, 2)  # (B,n,H,blk,Ev)
    bi, bk = (pairs.dirty & ~pairs.empty).nonzero(as_tuple=True)  # (P,), (P,)
    if bi.numel():
        allowed = block_band(blk, geo.w, masks.is_causal, out.device)[None, None]  # (1, 1, blk, span)
        if pairs.key_windows is not None:
            allowed = allowed & pairs.key_windows[bi, bk][:, None, None, :]  # (P, 1, blk, span)
        bias = None
        if masks.attn_mask is not None:
            first = (geo.lo + bk[:, None]) * blk  # (P, 1): first query row of each block
            rows = first + torch.arange(blk, device=out.device)  # (P, blk): query i
            # key j of window column c: first query row of the block + d - w + c
            cols = first + (geo.d - geo.w) + torch.arange(span, device=out.device)  # (P, span)
            am = _gather_blocks(masks.attn_mask, bi, rows, cols)  # (P, H|1, blk, span)
            allowed, bias = and_attn_mask(allowed, am)
        inner.index_put_((bi, bk), masked_sdpa(
            q_run.view(b, h, n, blk, e)[bi, :, bk],  # (P, H, blk, E) gathered copies
            k_run.view(b, h, n, span, e)[bi, :, bk],  # (P, H, span, E)
            v_run.view(b, h, n, span, ev)[bi, :, bk],
            allowed, bias, dropout_p=dropout_p, scale=scale,
        ))
    zi, zk = pairs.empty.nonzero(as_tuple=True)  # pairs with no real key: output 0
    if zi.numel():
        inner.index_put_((zi, zk), out.new_zeros(()))


def _edge(qs: Tensor, ks: Tensor, vs: Tensor, masks: Masks, rows: Rows, cols: Rows,
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
