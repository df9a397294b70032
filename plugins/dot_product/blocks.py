"""One (query piece, key piece) block of ring attention: partial output and log-sum-exp
(forward), gradient contributions from the final output and log-sum-exp (backward).

Two implementations of the same math:

- ``flash``: torch's fused CPU flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu``
  and its backward, which return / take the log-sum-exp): fast, O(block) memory. Used on the CPU
  for blocks without a mask or with the square causal mask of a diagonal block (the only masked
  blocks of self-attention in the zigzag layout); a key_mask rides along as an additive
  (B, 1, 1, nk) bias. Head dims E != Ev are zero-padded to the larger (zeros add nothing to a
  dot product); grouped key/value heads are repeated per query head for the kernel (a copy of
  the block's keys, never of the shard).
- ``explicit``: the formula in tiles of at most ``_TILE_ELEMENTS`` scores and at most the
  block's query size (so the working set shrinks with the shard): any device, any causal offset
  (cross attention, lower-right alignment), the reference the flash path is tested against.

Rows with no allowed key get output 0 and log-sum-exp -inf (the fused kernel reports 0 there;
it is corrected from the masks), so ``lse_merge`` never mixes them in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import causal_mask, repeat_kv
from attnreg.core.parallel import lse_merge

__all__ = ["USE_FLASH", "block_backward", "block_forward"]

# Set False to force the explicit path everywhere (tests compare the two).
USE_FLASH = True
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Scores per explicit tile (B * H * rows * keys), at most: 8 MB in float32.
_TILE_ELEMENTS = 1 << 21


def _use_flash(q: Tensor, diff: int | None, nq: int, nk: int) -> bool:
    return (USE_FLASH and _FLASH is not None and _FLASH_BWD is not None and q.device.type == "cpu"
            and (diff is None or (diff == 0 and nq == nk)))


def block_forward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, diff: int | None, scale: float,
                  out: Tensor, lse: Tensor) -> None:
    """Merge the block of ``q`` (B, H, nq, E) against ``k`` / ``v`` (B, Hkv, nk, E|Ev) into
    ``out`` (B, H, nq, Ev) and ``lse`` (B, H, nq) in place (all in ``q``'s dtype).

    ``km`` (B, nk): real keys; ``diff``: None (every key visible) or causal, row i seeing key
    j <= i + diff.
    """
    if _use_flash(q, diff, q.shape[2], k.shape[2]):
        o_t, l_t = _flash_forward(q, k, v, km, diff is not None, scale)
        o_new, l_new = lse_merge(out, lse, o_t, l_t)
        out.copy_(o_new)
        lse.copy_(l_new)
        return
    _explicit_forward(q, k, v, km, diff, scale, out, lse)


def block_backward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, diff: int | None, scale: float,
                   do: Tensor, out: Tensor, lse: Tensor, delta: Tensor, dq: Tensor | None,
                   dk: Tensor | None, dv: Tensor | None) -> None:
    """Add the block's gradient contributions into ``dq`` (B, H, nq, E) and ``dk`` / ``dv``
    (B, Hkv, nk, E|Ev), given the upstream ``do`` and the FINAL ``out`` (B, H, nq, Ev), ``lse``
    (B, H, nq) and ``delta = rowsum(do * out)`` (B, H, nq) over every key."""
    if _use_flash(q, diff, q.shape[2], k.shape[2]):
        _flash_backward(q, k, v, km, diff is not None, scale, do, out, lse, dq, dk, dv)
        return
    _explicit_backward(q, k, v, km, diff, scale, do, lse, delta, dq, dk, dv)


# -- flash --------------------------------------------------------------------------------------
def _padded(t: Tensor, width: int, heads: int | None = None) -> Tensor:
    """``t`` (B, H', n, D) repeated to ``heads`` and zero-padded to ``width`` in its last dim.

    A row-narrowed view of a shard stays a view (no copy of the block): the kernels read rows
    through the strides and only need a unit stride in the last dim.
    """
    if heads is not None and t.shape[1] != heads:
        t = repeat_kv(t, heads)  # (B, H, n, D)
    if t.shape[-1] < width:
        t = F.pad(t, (0, width - t.shape[-1]))
    return t if t.stride(-1) == 1 else t.contiguous()


def _group_sum(t: Tensor, hkv: int) -> Tensor:
    """(B, H, n, D) -> (B, Hkv, n, D): the gradients of a key/value head's G query heads summed."""
    b, h, n, d = t.shape
    return t if h == hkv else t.reshape(b, hkv, h // hkv, n, d).sum(dim=2)


def _bias(km: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if km is None:
        return None
    bias = torch.zeros(km.shape, dtype=dtype, device=km.device).masked_fill_(~km, float("-inf"))  # (B, nk)
    return bias[:, None, None, :]  # (B, 1, 1, nk)


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor]:
    h, e, ev = q.shape[1], q.shape[-1], v.shape[-1]
    width = max(e, ev)
    out, lse = _FLASH(_padded(q, width), _padded(k.to(q.dtype), width, h),  # type: ignore[misc]
                      _padded(v.to(q.dtype), width, h), 0.0, causal,
                      attn_mask=_bias(km, q.dtype), scale=scale)  # (B, H, nq, D), (B, H, nq)
    if km is not None:  # the kernel reports lse 0 on rows with no allowed key
        alive = km.cumsum(dim=-1) > 0 if causal else km.any(dim=-1, keepdim=True)  # (B, nq) | (B, 1)
        lse = lse.masked_fill(~alive[:, None, :], float("-inf"))
    return out[..., :ev], lse.to(q.dtype)


def _flash_backward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, causal: bool, scale: float,
                    do: Tensor, out: Tensor, lse: Tensor, dq: Tensor | None, dk: Tensor | None,
                    dv: Tensor | None) -> None:
    h, e, ev, hkv = q.shape[1], q.shape[-1], v.shape[-1], k.shape[1]
    width = max(e, ev)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no key: p = 0
    gq, gk, gv = _FLASH_BWD(  # type: ignore[misc]
        _padded(do, width), _padded(q, width), _padded(k.to(q.dtype), width, h),
        _padded(v.to(q.dtype), width, h), _padded(out, width), safe, 0.0, causal,
        attn_mask=_bias(km, q.dtype), scale=scale)  # (B, H, nq|nk, D)
    if dq is not None:
        dq.add_(gq[..., :e])
    if dk is not None:
        dk.add_(_group_sum(gk[..., :e], hkv))
    if dv is not None:
        dv.add_(_group_sum(gv[..., :ev], hkv))


# -- explicit -----------------------------------------------------------------------------------
def _tiles(b: int, h: int, n_rows: int, n_keys: int, width: int) -> list[tuple[int, int]]:
    """Row ranges whose scores (B * H * rows * keys) fit ``_TILE_ELEMENTS`` and the block's own
    queries (B * H * rows_total * E), so the working set shrinks with the shard."""
    budget = min(_TILE_ELEMENTS, max(b * h * n_rows * width, 1 << 16))
    step = max(1, budget // max(1, b * h * n_keys))
    return [(t0, min(n_rows, t0 + step)) for t0 in range(0, n_rows, step)]


def _allowed(rows: tuple[int, int], nk: int, diff: int | None, km: Tensor | None,
             device: torch.device) -> Tensor | None:
    """Bool (B|1, 1, 1, rows, nk) of the allowed entries of a tile, None if all are."""
    out = None
    if diff is not None:
        out = causal_mask(rows[1] - rows[0], nk, device, diff + rows[0])  # (rows, nk)
    if km is not None:
        kmb = km[:, None, None, None, :]  # (B, 1, 1, 1, nk)
        out = kmb if out is None else out & kmb
    return out


def _fold(t: Tensor, hkv: int) -> Tensor:
    """(B, H, n, D) -> (B, Hkv, G, n, D): the G query heads of a key/value head (a view)."""
    b, h, n, d = t.shape
    return t.view(b, hkv, h // hkv, n, d)


def _scores(q5: Tensor, ks: Tensor, rows: tuple[int, int], allowed: Tensor | None, scale: float) -> Tensor:
    s = (q5[..., rows[0]:rows[1], :] @ ks.transpose(-1, -2)) * scale  # (B, Hkv, G, tq, nk)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def _explicit_forward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, diff: int | None,
                      scale: float, out: Tensor, lse: Tensor) -> None:
    hkv, nk = k.shape[1], k.shape[2]
    q5, out5, lse4 = _fold(q, hkv), _fold(out, hkv), lse.view(*_fold(out, hkv).shape[:-1])
    ks, vs = k.to(q.dtype)[:, :, None], v.to(q.dtype)[:, :, None]  # (B, Hkv, 1, nk, E|Ev)
    b, _, g, nq, e = q5.shape
    for rows in _tiles(b, hkv * g, nq, nk, e):
        s = _scores(q5, ks, rows, _allowed(rows, nk, diff, km, q.device), scale)
        lse_t = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, tq); -inf where no key is allowed
        safe = torch.where(torch.isfinite(lse_t), lse_t, torch.zeros_like(lse_t))
        o_t = torch.exp(s - safe[..., None]) @ vs  # (B, Hkv, G, tq, Ev)
        o_view, l_view = out5[..., rows[0]:rows[1], :], lse4[..., rows[0]:rows[1]]
        o_new, l_new = lse_merge(o_view, l_view, o_t, lse_t)
        o_view.copy_(o_new)
        l_view.copy_(l_new)


def _explicit_backward(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None, diff: int | None,
                       scale: float, do: Tensor, lse: Tensor, delta: Tensor, dq: Tensor | None,
                       dk: Tensor | None, dv: Tensor | None) -> None:
    hkv, nk = k.shape[1], k.shape[2]
    q5, do5 = _fold(q, hkv), _fold(do, hkv)
    dq5 = None if dq is None else _fold(dq, hkv)
    lse4, delta4 = lse.view(*q5.shape[:-1]), delta.view(*q5.shape[:-1])  # (B, Hkv, G, nq)
    ks, vs = k.to(q.dtype)[:, :, None], v.to(q.dtype)[:, :, None]  # (B, Hkv, 1, nk, E|Ev)
    b, _, g, nq, e = q5.shape
    safe = torch.where(torch.isfinite(lse4), lse4, torch.zeros_like(lse4))  # rows with no key: p = 0
    for r0, r1 in _tiles(b, hkv * g, nq, nk, e):
        s = _scores(q5, ks, (r0, r1), _allowed((r0, r1), nk, diff, km, q.device), scale)
        p = torch.exp(s - safe[..., r0:r1, None])  # (B, Hkv, G, tq, nk): the final weights
        do_t = do5[..., r0:r1, :]  # (B, Hkv, G, tq, Ev)
        if dv is not None:
            dv.add_((p.transpose(-1, -2) @ do_t).sum(dim=2))  # (B, Hkv, nk, Ev)
        ds = p * (do_t @ vs.transpose(-1, -2) - delta4[..., r0:r1, None])  # (B, Hkv, G, tq, nk)
        if dq5 is not None:
            dq5[..., r0:r1, :].add_(ds @ ks, alpha=scale)  # (B, Hkv, G, tq, E)
        if dk is not None:
            dk.add_((ds.transpose(-1, -2) @ q5[..., r0:r1, :]).sum(dim=2), alpha=scale)  # (B, Hkv, nk, E)
