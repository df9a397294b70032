"""Masked-position invariance for any values: NaN and inf at masked keys/values change nothing.

Fused kernels mask by adding ``-inf`` to the logits and multiply the weights by the values, so a
non-finite key or value at a masked position poisons rows that never see it: ``NaN + -inf`` is
NaN before the softmax and ``0 * NaN`` is NaN in ``P @ V``; and in backward, a row whose output
is NaN spreads NaN to every key it read. The remedy, once per call:

1. ``screen``: keys and values with every non-finite entry replaced by 0, and ``bad``, the
   positions that held one. Masked positions then contribute what any finite value does:
   nothing.
2. The kernel runs on the screened inputs.
3. ``poison_rows``: every query row that may attend to a bad position (``hits_under``, or the
   variant's own test for its pattern) becomes NaN, so a non-finite input a row *does* see is
   never silently replaced by 0.

Cost: screening copies key and value, which on CPU costs page faults comparable to the attention
of a short window. So in eager mode ``screen`` first checks, with a sum (a NaN or inf makes it
non-finite), only the positions some query cannot see (padding: just the padded positions; the
causal future of a lower-right call: its last Lq - 1 keys; else everything), and returns the
inputs untouched when they are finite, the usual case. That check reads values on the host;
under ``torch.compile`` or CUDA graph capture, where a data-dependent branch is impossible,
``screen`` screens unconditionally. On ``meta`` there are no values: nothing to do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import Masks

__all__ = ["hits_under", "poison_rows", "screen", "screen_kv", "screening_needed", "span_hits"]

# Row chunk of the dense (attn_mask) hit test: at most this many mask entries at a time.
_DENSE_ELEMENTS = 1 << 24


def screening_needed(masks: Masks, pattern_hides: bool = False) -> bool:
    """Whether some query cannot see some key of this call, so that its key/value must be
    screened: an ``attn_mask``, a causal mask hiding a key from some query, the variant's own
    pattern (``pattern_hides``: a window, a block layout), or padding that no decoding state
    has zeroed already (``Masks.padding_zeroed``)."""
    if masks.attn_mask is not None or pattern_hides:
        return True
    if _causal_hides(masks):
        return True
    return masks.key_mask is not None and not masks.padding_zeroed


def _causal_hides(masks: Masks) -> bool:
    return masks.is_causal and masks.q_offset < masks.k_len - 1  # query 0 sees keys <= q_offset


def _branchless(t: Tensor) -> bool:
    """No data-dependent branch is possible: compiling, or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _all_finite(*tensors: Tensor) -> bool:
    """True when every entry is finite: a NaN or inf makes a sum non-finite. A finite sum that
    overflows reads as non-finite too, which only sends the call down the exact path."""
    total = sum(t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None) for t in tensors)
    return bool(torch.isfinite(total))


def _replace_nonfinite(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fk, fv = torch.isfinite(key), torch.isfinite(value)
    bad = ~(fk.all(-1) & fv.all(-1))  # (B, Hkv, Lk)
    return torch.where(fk, key, 0.0), torch.where(fv, value, 0.0), bad


def screen_kv(key: Tensor, value: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(key, value, bad)``: the inputs (B, Hkv, Lk, E|Ev) with non-finite entries replaced by
    0, and ``bad`` (B, Hkv, Lk) bool, the positions whose key or value held one.

    ``bad`` is None (and key/value are returned as they are) when nothing needs screening: the
    positions from ``start`` on (the ones some query cannot see; earlier ones are seen by every
    query) are all finite, or the tensors are on ``meta``. Gradients reach the finite entries
    unchanged; the replaced ones get 0.
    """
    if key.device.type == "meta":
        return key, value, None
    if not _branchless(key) and _all_finite(key[:, :, start:], value[:, :, start:]):
        return key, value, None
    return _replace_nonfinite(key, value)


def _padded_rows(key: Tensor, value: Tensor, key_mask: Tensor) -> list[Tensor]:
    """The key and value entries at padded positions (key_mask (B, Lk) False): (P*Hkv, E|Ev)
    or (P, Hkv, E|Ev); none when nothing is padded."""
    bi, ji = (~key_mask).nonzero(as_tuple=True)  # (P,)
    if not bi.numel():
        return []
    b, h, lk, _ = key.shape
    if key.is_contiguous() and value.is_contiguous():  # one index_select per tensor, no copy of it
        heads = torch.arange(h, device=key.device)  # (Hkv,)
        rows = ((bi[:, None] * h + heads) * lk + ji[:, None]).reshape(-1)  # (P*Hkv,) rows of (B*Hkv*Lk, E)
        return [t.view(b * h * lk, -1).index_select(0, rows) for t in (key, value)]
    return [key[bi, :, ji], value[bi, :, ji]]


def screen(key: Tensor, value: Tensor, masks: Masks, pattern_hides: bool = False
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``screen_kv`` where ``masks`` (and the variant's pattern, ``pattern_hides``) hide some key
    from some query; ``(key, value, None)`` where nothing is hidden.

    The eager check reads only the hidden positions: with padding alone, the padded ones (a
    single-token step over a padded KV cache reads a few rows, not the cache); with a
    lower-right causal mask, the last Lq - 1 keys and the padding.
    """
    if not screening_needed(masks, pattern_hides) or key.device.type == "meta":
        return key, value, None
    if _branchless(key) or pattern_hides or masks.attn_mask is not None:
        return screen_kv(key, value)
    parts = []
    if _causal_hides(masks):
        start = masks.q_offset + 1  # keys before it are seen by every query (padding aside)
        parts += [key[:, :, start:], value[:, :, start:]]
    if masks.key_mask is not None and not masks.padding_zeroed:
        parts += _padded_rows(key, value, masks.key_mask)
    if not parts or _all_finite(*parts):
        return key, value, None
    return _replace_nonfinite(key, value)


class _Poison(torch.autograd.Function):
    """``out`` with rows ``hit`` set to NaN. Backward: the incoming gradient, NaN on hit rows
    wherever it is non-zero. Plain ``out * NaN`` would also turn the zero gradient of a row the
    loss ignores into NaN (0 * NaN) and spread it to every input that row saw; a row the loss
    does use gets a NaN gradient, as through the raw non-finite input (so a gradient scaler
    still notices)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: Tensor, hit: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(hit)
        return out.masked_fill(hit, float("nan"))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (hit,) = ctx.saved_tensors
        return grad.masked_fill(hit & (grad != 0), float("nan")), None  # differentiable in grad


def poison_rows(out: Tensor, hit: Tensor | None) -> Tensor:
    """``out`` (B, H, Lq, Ev) with the rows ``hit`` (B, H or Hkv, Lq) bool made NaN.

    ``hit`` may have the key/value heads of a grouped-query call (each covers H / Hkv query
    heads). The gradient through a hit row is NaN where the loss depends on it, 0 where not.
    """
    if hit is None:
        return out
    if hit.shape[1] != out.shape[1]:
        hit = hit.repeat_interleave(out.shape[1] // hit.shape[1], dim=1)  # (B, H, Lq)
    return _Poison.apply(out, hit[..., None])


def span_hits(bad: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(B, Hkv, Lq) bool: rows whose key span ``[lo_i, hi_i]`` (inclusive, (Lq,) long, clamped
    to the keys; empty when hi < lo) holds a position of ``bad`` (B, Hkv, Lk). O(Lq + Lk)."""
    lk = bad.shape[-1]
    counts = F.pad(bad.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))  # (B, Hkv, Lk + 1)
    start = lo.clamp(0, lk)
    stop = torch.maximum((hi + 1).clamp(0, lk), start)
    return (counts[..., stop] - counts[..., start]) > 0


def hits_under(bad: Tensor | None, masks: Masks, window: int | None = None) -> Tensor | None:
    """The rows that may attend to a ``bad`` position under ``masks`` (and a band of
    ``window`` keys each side of the query's position, where given): (B, H|Hkv, Lq) bool, or
    None when ``bad`` is None.

    Without ``attn_mask`` this is a prefix-sum over the keys (O(Lq + Lk)); with one, the masks
    are tested densely, a chunk of query rows at a time.
    """
    if bad is None:
        return None
    if masks.key_mask is not None:
        bad = bad & masks.key_mask[:, None, :]  # (B, Hkv, Lk): padding is never seen
    dev, lq, lk = bad.device, masks.q_len, masks.k_len
    pos = torch.arange(lq, device=dev) + masks.q_offset  # (Lq,) key position of query i
    lo = pos - window if window is not None else torch.zeros_like(pos)
    hi = pos if masks.is_causal else (pos + window if window is not None else torch.full_like(pos, lk - 1))
    if masks.attn_mask is None:
        return span_hits(bad, lo, hi)
    am = masks.attn_mask  # (B|1, H|1, Lq|1, Lk|1)
    if am.shape[1] > 1 and am.shape[1] != bad.shape[1]:  # grouped-query: per query head
        bad = bad.repeat_interleave(am.shape[1] // bad.shape[1], dim=1)  # (B, H, Lk)
    cols = torch.arange(lk, device=dev)  # (Lk,)
    step = max(1, _DENSE_ELEMENTS // (max(bad.shape[0], am.shape[0]) * max(bad.shape[1], am.shape[1]) * lk))
    parts = []
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        rows = am[:, :, r0:r1] if am.shape[2] > 1 else am  # (B|1, H|1, c|1, Lk|1)
        ok = rows if rows.dtype == torch.bool else rows != float("-inf")
        span = (cols >= lo[r0:r1, None]) & (cols <= hi[r0:r1, None])  # (c, Lk)
        parts.append((ok & span & bad[:, :, None, :]).any(-1))  # (B, H, c)
    return torch.cat(parts, dim=-1)  # (B, H|Hkv, Lq)
