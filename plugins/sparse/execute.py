"""Running a plan: gather the active key blocks of every group and attend with one SDPA each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import and_attn_mask, masked_sdpa, poison_rows, sdpa_safe_mask

from .gather import Gatherer, Scratch, full_rows_attn_mask, gather_attn_mask, gather_rows
from .plan import Group, Plan

__all__ = ["run_plan"]

_STREAM_BYTES = 8 << 20  # gathered keys + values per SDPA call without autograd


def run_plan(
    plan: Plan, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None,
    attn_mask: Tensor | None, *, block: int, scale: float, dropout: float, scratch: Scratch,
    bad: Tensor | None = None,
) -> Tensor:
    """Output (B, H, Lq, Ev) of the queries ``plan`` covers.

    query (B, H, Lq, E); key / value (B, H, Lk, E|Ev) with ``Lk <= plan.padded_len`` (zero
    tokens complete the last block here; a caller holding whole blocks passes them as they
    are, without a copy); key_mask (B, Lk) bool or None; attn_mask (B|1, H|1, Lq|1, Lk|1) or None.
    ``bad`` (B, H, Lk) bool: positions whose key/value were screened (``screen_kv``); a row
    whose mask lets it see one of them gets a NaN output.
    """
    bsz, heads, lq, e = query.shape
    ev = value.shape[-1]
    b, w = block, plan.q_width
    q_back = plan.q_blocks * w - plan.q_front - lq
    if plan.q_front or q_back:
        query = F.pad(query, (0, 0, plan.q_front, q_back))  # (B, H, q_blocks*w, E)
    k_pad = plan.padded_len - key.shape[2]
    if k_pad:  # masks keep the zero tokens out of every real row
        key, value = (F.pad(t, (0, 0, 0, k_pad)) for t in (key, value))
        if key_mask is not None:
            key_mask = F.pad(key_mask, (0, k_pad), value=False)  # (B, Lp)
        if bad is not None:
            bad = F.pad(bad, (0, k_pad), value=False)  # (B, H, Lp)
    km = None if key_mask is None else key_mask.reshape(bsz, plan.nb, b)  # (B, nb, b)
    outs = []
    # One flat row per (batch, head, block): index_select on dim 0 copies whole blocks. All
    # groups gather at once, so that backward is one index_add per input.
    q3 = query.reshape(bsz * heads * plan.q_blocks, w, e)  # (B*H*nq, w, E)
    k3 = key.reshape(bsz * heads * plan.nb, b, e)  # (B*H*nb, b, E)
    v3 = value.reshape(bsz * heads * plan.nb, b, ev)  # (B*H*nb, b, Ev)
    bad3 = None if bad is None else bad.reshape(bsz * heads * plan.nb, b)  # (B*H*nb, b)
    # Autograd keeps the gathered blocks for backward; without it they are scratch space and
    # reuse the module's buffers (fresh multi-MB buffers cost page faults that rival the
    # copy itself); a concurrent call on the module from another thread allocates its own.
    reuse = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                              or value.requires_grad))
    q_off = torch.arange(bsz, device=query.device) * (heads * plan.q_blocks)  # (B,) first query row
    k_off = q_off if plan.q_blocks == plan.nb else torch.arange(bsz, device=query.device) * (heads * plan.nb)
    args = (plan, km, attn_mask, b, query.dtype)
    with scratch.lease(reuse) as gatherer:  # the views below read the buffers until here
        if plan.groups and reuse:
            for g in plan.groups:
                outs.append(_group_streamed(g, gatherer, q3, k3, v3, bad3, args, q_off, k_off, scale,
                                            dropout))
        elif plan.groups:
            index = [_gather_index(g, q_off, k_off, 0, g.rows.shape[0]) for g in plan.groups]
            q_all = gatherer.gather("q", q3, torch.cat([i for i, _ in index]))  # (sum n*B, w, E)
            ki = torch.cat([j for _, j in index])
            k_all = gatherer.gather("k", k3, ki)  # (sum n*B*c, b, E)
            v_all = gatherer.gather("v", v3, ki)  # (sum n*B*c, b, Ev)
            # split (not slicing): its backward assembles the gradient in one pass.
            q_parts = q_all.split([g.rows.shape[0] * bsz for g in plan.groups])
            k_parts = k_all.split([g.kv_rows.numel() * bsz for g in plan.groups])
            v_parts = v_all.split([g.kv_rows.numel() * bsz for g in plan.groups])
            for g, (_, ki), qp, kp, vp in zip(plan.groups, index, q_parts, k_parts, v_parts, strict=True):
                mask, dead, allowed = _group_mask(g, *args)
                seen = _seen(allowed, bad3, ki, g.kv_rows.shape[0], bsz, w)  # (n, B, w) or None
                og = _attend_rows(qp, kp, vp, g.kv_rows.shape[1], bsz, mask, scale, dropout, seen)
                outs.append(_zero_dead(og, dead))  # (n, B, w, Ev)
    if plan.full is not None:
        outs.append(_attend_full(plan, query, key, value, attn_mask, key_mask, b, scale, dropout, lq, bad))
    if plan.has_empty:
        outs.append(query.new_zeros(1, bsz, w, ev))  # read by rows with no key block
    out = gather_rows(torch.cat(outs), plan.inverse)  # (H*nq, B, w, Ev) in row order
    out = out.view(heads, plan.q_blocks, bsz, w, ev).permute(2, 0, 1, 3, 4)  # (B, H, nq, w, Ev)
    out = out.reshape(bsz, heads, plan.q_blocks * w, ev)  # (B, H, nq*w, Ev)
    return out[:, :, plan.q_front : plan.q_front + lq]  # (B, H, Lq, Ev)


def _group_streamed(
    g: Group, gatherer: Gatherer, q3: Tensor, k3: Tensor, v3: Tensor, bad3: Tensor | None, args: tuple,
    q_off: Tensor, k_off: Tensor, scale: float, dropout: float,
) -> Tensor:
    """One group without autograd, gathered and attended a few rows at a time (n, B, w, Ev).

    Gathering every row first needs the group's keys and values all at once (536 MB of scratch
    for bigbird at B=1, H=8, L=16K); chunks of ~8 MB need 8 MB, at the same speed within
    noise (measured 263-300 ms either way, forward at L=16K). The SDPA mask and the rows with
    nothing to attend are found once per group (a host sync), not per chunk.
    """
    n, c = g.kv_rows.shape
    bsz = q_off.shape[0]
    mask, dead, allowed = _group_mask(g, *args)  # (n|1, ...) or None
    step = max(1, _STREAM_BYTES // (bsz * c * k3.shape[1] * (q3.shape[-1] + v3.shape[-1])
                                    * q3.element_size()))
    parts = []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qi, ki = _gather_index(g, q_off, k_off, r0, r1)
        m, a = (t[r0:r1] if t is not None and t.shape[0] > 1 else t for t in (mask, allowed))
        seen = _seen(a, bad3, ki, r1 - r0, bsz, q3.shape[1])  # (r, B, w) or None
        # SDPA's output is a fresh tensor, so the next chunk may reuse the scratch.
        parts.append(_attend_rows(gatherer.gather("q", q3, qi), gatherer.gather("k", k3, ki),
                                  gatherer.gather("v", v3, ki), c, bsz, m, scale, dropout, seen))
    return _zero_dead(torch.cat(parts) if len(parts) > 1 else parts[0], dead)  # (n, B, w, Ev)


def _attend_rows(q: Tensor, k: Tensor, v: Tensor, c: int, bsz: int, mask: Tensor | None,
                 scale: float, dropout: float, seen: Tensor | None = None) -> Tensor:
    """SDPA over gathered rows: q (r*B, w, E), k / v (r*B*c, b, E|Ev) -> (r, B, w, Ev) under an
    ``sdpa_safe_mask`` ``mask`` (its empty rows are zeroed by the caller, ``_zero_dead``); rows
    that see a screened position (``seen``, (r, B, w) bool) give NaN."""
    r, w = q.shape[0] // bsz, q.shape[1]
    kb = c * k.shape[1]
    og = F.scaled_dot_product_attention(
        q.view(r, bsz, w, q.shape[-1]), k.view(r, bsz, kb, k.shape[-1]),
        v.view(r, bsz, kb, v.shape[-1]),  # (r, B, w|c*b, E|Ev)
        attn_mask=mask, dropout_p=dropout, scale=scale,
    )  # (r, B, w, Ev)
    return poison_rows(og, seen)  # (r, B, w, Ev): rows that see a screened position: NaN


def _zero_dead(og: Tensor, dead: Tensor | None) -> Tensor:
    """Rows of a group's output (n, B, w, Ev) that have nothing to attend (``dead``, from
    ``sdpa_safe_mask``), set to 0: ``masked_sdpa``'s last step, after the group's chunks."""
    return og.masked_fill(dead, 0.0) if dead is not None else og


def _attend_full(
    plan: Plan, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
    key_mask: Tensor | None, b: int, scale: float, dropout: float, length: int, bad: Tensor | None,
) -> Tensor:
    """Rows that see every key block: their queries against the whole (padded) sequence.

    Only in plans of full (non-causal) calls. Returns (H*m, B, b, Ev) in the order of
    ``plan.full.rows``.
    """
    full = plan.full
    assert full is not None
    bsz, heads, lp, e = query.shape
    m = full.query_blocks.shape[1]
    hh = torch.arange(heads, device=query.device)[:, None]  # (H, 1)
    qf = query.view(bsz, heads, plan.nb, b, e)[:, hh, full.query_blocks]  # (B, H, m, b, E)
    qf = qf.reshape(bsz, heads, m * b, e)  # (B, H, m*b, E)
    allowed = None if full.key_valid is None else full.key_valid[None, None, None]  # (1, 1, 1, Lp)
    if key_mask is not None:
        kmf = key_mask[:, None, None, :]  # (B, 1, 1, Lp)
        allowed = kmf if allowed is None else allowed & kmf
    bias = None
    if attn_mask is not None:
        am = full_rows_attn_mask(attn_mask, full, plan, b, length)  # (B|1, H|1, m*b|1, Lp|1)
        allowed, bias = and_attn_mask(allowed, am)
    og = masked_sdpa(qf, key, value, allowed, bias, dropout_p=dropout, scale=scale)  # (B, H, m*b, Ev)
    if bad is not None:  # rows that see a screened position: NaN
        seen = bad[:, :, None, :] if allowed is None else allowed & bad[:, :, None, :]  # (B, H, m*b|1, Lp)
        og = poison_rows(og, seen.any(-1).expand(*og.shape[:3]))
    ev = og.shape[-1]
    return og.reshape(bsz, heads * m, b, ev).transpose(0, 1)  # (H*m, B, b, Ev)


def _group_mask(
    g: Group, plan: Plan, km: Tensor | None, attn_mask: Tensor | None, b: int, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """SDPA mask of one group (None when nothing is masked), its rows with nothing to attend,
    and what its rows may attend.

    Returns (mask, dead, allowed): mask is bool, or float when a float attn_mask is in force,
    shaped (n|1, B|1, w|1, c*b); dead is (n, B|1, w|1, 1) or None; allowed is the bool pattern
    before empty rows are opened, (n|1, B|1, w|1, c*b), or None (every gathered key).
    """
    n, c = g.kv_rows.shape
    allowed = None if g.struct_mask is None else g.struct_mask[None, None]  # (1, 1, w, c*b)
    if km is not None:
        kmg = km[:, g.key_blocks].transpose(0, 1).reshape(n, km.shape[0], 1, c * b)  # (n, B, 1, c*b)
        allowed = kmg if allowed is None else allowed & kmg
    bias = None
    if attn_mask is not None:
        am = gather_attn_mask(attn_mask, g, plan, b)  # (n, B|1, w|1, c*b)
        allowed, bias = and_attn_mask(allowed, am)
    if allowed is None:
        return None, None, None
    return (*sdpa_safe_mask(allowed, bias, dtype), allowed)


def _seen(allowed: Tensor | None, bad3: Tensor | None, ki: Tensor, rows: int, bsz: int, width: int
          ) -> Tensor | None:
    """(r, B, w) bool: gathered rows whose ``allowed`` keys hold a screened position, from
    ``bad3`` (B*H*nb, b) and the key blocks ``ki`` (r*B*c,) they read; None without ``bad3``."""
    if bad3 is None:
        return None
    badg = bad3.index_select(0, ki).view(rows, bsz, 1, -1)  # (r, B, 1, c*b)
    return (badg if allowed is None else allowed & badg).any(-1).expand(rows, bsz, width)


def _gather_index(g: Group, q_off: Tensor, k_off: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
    """Flat indices of rows ``r0:r1`` of group ``g`` for every batch item: queries (r*B,) and
    their key blocks (r*B*c,), row-major then batch, as ``_attend_rows`` views them."""
    qi = (g.rows[r0:r1, None] + q_off).reshape(-1)
    ki = (g.kv_rows[r0:r1, None, :] + k_off[:, None]).reshape(-1)
    return qi, ki
