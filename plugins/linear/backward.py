"""First-order backward of the streamed kernel (``kernels._Streamed``), written by hand.

Walks the segments in reverse, recomputing features and chunk scores from q, k, v (only the chunk
prefix states and the normaliser were kept). Besides the chain rule of ``num / den``:

- the floor: a row whose divisor is the floor ``eps * |phi_q|_1 * |z_i|_1`` (not ``live``) passes
  its gradient on to both norms: to every feature of its query and, through ``|z_i|_1``, to every
  feature of each key it reads (``d_floor``; only when such a row exists).
- poison (``poison_masks``): where the forward met NaN or inf, a row with no upstream gradient and
  a non-finite output takes no part, and neither do keys that only such rows read. Their
  gradient is 0, as the chain rule says of a zero upstream gradient; IEEE arithmetic would
  otherwise turn ``0 * NaN`` into NaN and spread it to every earlier position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnreg.core import known

from .segments import (
    Plan,
    chunks,
    feature_grad,
    features,
    keys,
    layout,
    rows,
    spans,
    state_norm,
    store,
    unchunk,
)

__all__ = ["poison_masks", "streamed_backward"]


def poison_masks(grad: Tensor, grad_state: Tensor, out: Tensor, div: Tensor, run: Tensor,
                 allowed: Tensor | None, plan: Plan, lq: int, lk: int) -> tuple[Tensor, Tensor]:
    """(query rows that take part (B, H, Lq, 1), keys that take part (B, H, Lk, 1), the key mask
    included). A row is out when its upstream gradient is 0 and its output non-finite; the final
    state likewise (``grad_state`` 0, ``run`` non-finite); a key is out when every row that reads
    it (and the final state) is out."""
    b, h = out.shape[:2]
    bad = ~torch.isfinite(out).all(dim=-1, keepdim=True) | ~torch.isfinite(div)  # (B, H, Lq, 1)
    q_in = ~(bad & (grad == 0).all(dim=-1, keepdim=True))  # (B, H, Lq, 1)
    st_bad = ~torch.isfinite(run.reshape(b, h, -1)).all(dim=-1)  # (B, H)
    st_in = ~(st_bad & (grad_state.reshape(b, h, -1) == 0).all(dim=-1))  # (B, H)
    qs, ks, n, _ = layout(lq, lk, plan)
    reader = q_in[:, :, qs:, 0].any(dim=-1) | st_in  # (B, H): someone reads every key of the past
    k_in = reader[:, :, None].expand(b, h, lk).clone()  # (B, H, Lk)
    if plan.causal:
        tail = q_in[:, :, qs + n:, 0].any(dim=-1) | st_in  # rows (and state) that read every key
        later = q_in[:, :, qs:qs + n, 0].flip(-1).to(torch.int8).cumsum(-1).flip(-1) > 0  # (B, H, n)
        k_in[:, :, ks:ks + n] = later | tail[:, :, None]  # key ks + t is read by rows qs + t' >= t
        k_in[:, :, ks + n:] = False  # in nobody's past
    k_in = k_in[..., None]  # (B, H, Lk, 1)
    return q_in, (k_in if allowed is None else k_in & allowed)


def streamed_backward(ctx: Any, grad: Tensor, grad_state: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients (q, k, v, None, init, None) of ``_Streamed`` (see the module docstring)."""
    q, k, v, allowed, _, out, div, live, run, *prefixes = ctx.saved_tensors
    plan: Plan = ctx.plan
    b, h, lq, f = q.shape
    lk, ev = k.shape[2], v.shape[-1]
    g, c, seg, eps = b * h, plan.chunk, plan.segment, plan.eps
    qs, ks, n_sq, pre = layout(lq, lk, plan)
    grad, grad_state = grad.to(plan.acc), grad_state.to(plan.acc)
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    qmask, kmask = None, allowed
    if not known(torch.isfinite(run).all() & torch.isfinite(div).all(), on_meta=True):
        qmask, kmask = poison_masks(grad, grad_state, out, div, run, allowed, plan, lq, lk)
    floor = not known(live.all(), on_meta=False)  # some divisor is the floor: the norms get gradients
    # Keys past the last query get no gradient in causal mode: they are in everyone's future.
    new = torch.zeros_like if ks + n_sq < lk and plan.causal else torch.empty_like
    dq = torch.empty_like(q) if need_q else None
    dk = new(k) if need_k else None
    dv = new(v) if need_v else None
    if dq is not None and qs:
        dq[:, :, :qs] = 0.0  # queries with no key: output 0 whatever they hold

    def g_num_den(s0: int, s1: int) -> tuple[Tensor, Tensor | None]:
        """Gradient of [num, den] (B, H, S, Ev + 1), and eps * that of the floor (B, H, S, 1)."""
        gn = torch.empty(b, h, s1 - s0, ev + 1, dtype=plan.acc, device=q.device)
        torch.div(grad[:, :, s0:s1], div[:, :, s0:s1], out=gn[..., :ev])
        qm = rows(qmask, s0, s1)
        if qm is not None:
            gn[..., :ev].masked_fill_(~qm, 0.0)
        g_div = -(gn[..., :ev] * out[:, :, s0:s1]).sum(dim=-1, keepdim=True)  # (B, H, S, 1)
        if qm is not None:
            g_div.masked_fill_(~qm, 0.0)
        lv = live[:, :, s0:s1]
        d_floor = g_div.masked_fill(lv, 0.0).mul_(eps) if floor else None
        gn[..., ev:] = g_div.masked_fill_(~lv, 0.0)
        return gn, d_floor

    # Gradient of the state read after a position, starting with that of the returned state.
    d_run = grad_state.reshape(g, f, ev + 1).clone()  # (G, F, Ev + 1)
    full = state_norm(run).view(b, h, 1, 1)  # |z|_1 of every key
    for s0, s1 in spans(qs + n_sq, lq, seg):
        qm = rows(qmask, s0, s1)
        xq, pq = features(q[:, :, s0:s1], plan, qm)  # (B, H, S, F)
        gn, d_floor = g_num_den(s0, s1)
        d_run.baddbmm_(pq.reshape(g, s1 - s0, f).mT, gn.view(g, s1 - s0, ev + 1))
        if d_floor is not None:  # |z|_1 = sum of the ones column: every z entry
            d_run[..., ev] += (d_floor * pq.sum(dim=-1, keepdim=True)).sum(dim=2).view(g, 1)
        if dq is not None:
            d_pq = torch.bmm(gn.view(g, s1 - s0, ev + 1), run.mT).view(b, h, s1 - s0, f)
            if d_floor is not None:
                d_pq += d_floor * full
            feature_grad(xq, pq, d_pq, plan, qm, dq[:, :, s0:s1])
    for (s0, s1), prefix in zip(reversed(spans(0, n_sq, seg)), reversed(prefixes), strict=True):
        a0, a1, k0, k1 = qs + s0, qs + s1, ks + s0, ks + s1  # query rows, key rows
        qm = rows(qmask, a0, a1)
        xq, pq = features(q[:, :, a0:a1], plan, qm)
        xk, pk, km, v1 = keys(k, v, kmask, plan, k0, k1)
        q3, k3, v3 = chunks(pq, c), chunks(pk, c), chunks(v1, c)  # (GN, C, F|F|Ev + 1)
        gn, d_floor = g_num_den(a0, a1)
        g3 = chunks(gn, c)  # (GN, C, Ev + 1)
        n, s = q3.shape[0] // g, s1 - s0
        if d_floor is not None:  # as the forward: |z_i|_1 = the state's before the segment + keys <= i
            z_rows = pk.sum(dim=-1, keepdim=True).cumsum_(dim=2).add_(
                state_norm(prefix[:, 0]).view(b, h, 1, 1))  # (B, H, S, 1)
            d_r = d_floor * z_rows  # of |phi_q|_1
            d_z = d_floor * pq.sum(dim=-1, keepdim=True)  # of |z_i|_1
            d_s = d_z.flip(2).cumsum(dim=2).flip(2)  # of each key's |phi_k|_1: the rows at or after it
        d_scores = torch.bmm(g3, v3.mT).tril_()  # (GN, C, C)
        d_prefix = torch.bmm(q3.mT, g3).view(g, n, f, ev + 1)
        # A chunk's state feeds the prefix of every later chunk, here and in later segments.
        d_states = torch.empty_like(d_prefix)  # (G, n, F, Ev + 1)
        d_states[:, -1] = d_run
        if n > 1:
            d_states[:, :-1] = d_prefix[:, 1:].flip(1).cumsum(dim=1).flip(1) + d_run[:, None]
        d_run = d_run + d_prefix.sum(dim=1)  # now: of the state before the segment
        if d_floor is not None:
            d_run[..., ev] += d_z.sum(dim=2).view(g, 1)
        ds3 = d_states.view(g * n, f, ev + 1)
        # Every product first: feature_grad may overwrite pq / pk (q3 / k3 are their views).
        d_pq = d_pk = None
        if dq is not None:
            d_pq = torch.bmm(d_scores, k3).baddbmm_(g3, prefix.view(g * n, f, ev + 1).mT)  # (GN, C, F)
        if dk is not None:
            d_pk = torch.bmm(d_scores.mT, q3).baddbmm_(v3, ds3.mT)  # (GN, C, F)
        if dv is not None:
            scores = torch.bmm(q3, k3.mT).tril_()  # (GN, C, C), recomputed
            d_v = torch.bmm(scores.mT, g3).baddbmm_(k3, ds3)  # (GN, C, Ev + 1)
            store(dv, k0, k1, unchunk(d_v, b, h, s)[..., :ev], km)
        if d_pq is not None:
            dpq = unchunk(d_pq, b, h, s)
            if d_floor is not None:
                dpq += d_r
            feature_grad(xq, pq, dpq, plan, qm, dq[:, :, a0:a1])
        if d_pk is not None:
            dpk = unchunk(d_pk, b, h, s)
            if d_floor is not None:
                dpk += d_s
            feature_grad(xk, pk, dpk, plan, km, dk[:, :, k0:k1])
    # d_run is now the gradient of the state before the causal pass: keys [0, pre) and init.
    if need_k or need_v:
        for s0, s1 in spans(0, pre, seg):
            xk, pk, km, v1 = keys(k, v, kmask, plan, s0, s1)
            v1 = v1.reshape(g, s1 - s0, ev + 1)
            if dv is not None:  # before feature_grad, which may overwrite pk
                d_v = torch.bmm(pk.reshape(g, s1 - s0, f), d_run[..., :ev]).view(b, h, s1 - s0, ev)
                store(dv, s0, s1, d_v, km)
            if dk is not None:
                d_pk = torch.bmm(v1, d_run.mT).view(b, h, s1 - s0, f)
                feature_grad(xk, pk, d_pk, plan, km, dk[:, :, s0:s1])
    d_init = d_run.view(b, h, f, ev + 1) if ctx.needs_input_grad[4] else None
    return dq, dk, dv, None, d_init, None
