"""Double backward of the streamed kernel: ``create_graph=True`` differentiates a plain-torch twin.

The hand-written backward (``backward.py``) works in place and is not itself differentiable. When
autograd asks for a graph of the gradient (gradient penalties, ``torch.autograd.gradgradcheck``,
meta-learning), ``_Streamed.backward`` runs with grad mode on and calls ``autodiff_backward``: it
recomputes the same function with ordinary differentiable ops (``differentiable_forward``, chunked
like the kernel: O(L * C + (L / C) * F * Ev) memory) from the saved inputs and returns
``torch.autograd.grad(..., create_graph=True)`` of it, whose graph reaches the original inputs and
the upstream gradient. Rows and keys outside the gradient's support under poison are masked as in
the first-order backward (``poison_masks``), so both orders agree on every input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import known

from .backward import poison_masks
from .segments import Plan, chunks, features, layout, normalised, state_norm, values

__all__ = ["autodiff_backward", "differentiable_forward"]


def differentiable_forward(q: Tensor, k: Tensor, v: Tensor, key_allowed: Tensor | None,
                           q_allowed: Tensor | None, init: Tensor | None, plan: Plan
                           ) -> tuple[Tensor, Tensor]:
    """The kernel's (output (B, H, Lq, Ev), final state (B, H, F, Ev + 1)) with autograd ops.

    ``q_allowed`` (B, H, Lq, 1) zeroes the features of query rows that take no part (poison).
    """
    b, h, lq, _ = q.shape
    lk, ev = k.shape[2], v.shape[-1]
    pq = features(q, plan, q_allowed)[1]  # (B, H, Lq, F)
    pk = features(k, plan, key_allowed)[1]  # (B, H, Lk, F)
    v1 = values(v, plan, key_allowed)  # (B, H, Lk, Ev + 1)
    f = pq.shape[-1]
    qs, ks, n, pre = layout(lq, lk, plan)
    run = init.to(plan.acc) if init is not None else pq.new_zeros(b, h, f, ev + 1)  # (B, H, F, Ev + 1)
    run = run + pk[:, :, :pre].mT @ v1[:, :, :pre]
    parts = [pq.new_zeros(b, h, qs, ev)] if qs else []
    if n:
        c = plan.chunk
        qa, ka, va = pq[:, :, qs:qs + n], pk[:, :, ks:ks + n], v1[:, :, ks:ks + n]
        q3, k3, v3 = chunks(qa, c), chunks(ka, c), chunks(va, c)  # (GN, C, F|F|Ev + 1)
        m = q3.shape[0] // (b * h)
        states = (k3.mT @ v3).view(b, h, m, f, ev + 1)  # each chunk's phi_k^T [v, 1]
        # The state before each chunk: a shifted sum (not cumsum - states, which would let a
        # chunk's own non-finite state into its prefix).
        prefix = run[:, :, None] + F.pad(states[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
        nd = (q3 @ k3.mT).tril() @ v3 + q3 @ prefix.reshape(b * h * m, f, ev + 1)  # (GN, C, Ev + 1)
        nd = nd.reshape(b, h, m * c, ev + 1)[:, :, :n]  # (B, H, n, Ev + 1)
        z = ka.sum(dim=-1, keepdim=True).cumsum(dim=2) + state_norm(run)[..., None, None]  # (B, H, n, 1)
        parts.append(normalised(nd, qa.sum(dim=-1, keepdim=True) * z, plan.eps))
        run = run + states.sum(dim=2)
    if lq > qs + n:  # queries that see every key
        qr = pq[:, :, qs + n:]  # (B, H, R, F)
        ref = qr.sum(dim=-1, keepdim=True) * state_norm(run)[..., None, None]
        parts.append(normalised(qr @ run, ref, plan.eps))
    return torch.cat(parts, dim=2), run


def autodiff_backward(ctx: Any, grad: Tensor, grad_state: Tensor) -> tuple[Tensor | None, ...]:
    """Differentiable gradients (q, k, v, None, init, None) of ``_Streamed`` (module docstring)."""
    q, k, v, allowed, init, out, div, _, run, *_ = ctx.saved_tensors
    plan: Plan = ctx.plan
    q_allowed, k_allowed = None, allowed
    with torch.no_grad():
        if not known(torch.isfinite(run).all() & torch.isfinite(div).all(), on_meta=True):
            q_allowed, k_allowed = poison_masks(grad.to(plan.acc), grad_state.to(plan.acc), out, div,
                                                run, allowed, plan, q.shape[2], k.shape[2])
    need = ctx.needs_input_grad
    inputs = [(i, t) for i, t in ((0, q), (1, k), (2, v), (4, init)) if need[i]]
    with torch.enable_grad():
        o, st = differentiable_forward(q, k, v, k_allowed, q_allowed, init, plan)
        upstream = (grad.to(o.dtype), grad_state.to(st.dtype))
        got = torch.autograd.grad((o, st), [t for _, t in inputs], upstream, create_graph=True,
                                  allow_unused=True)
    res: list[Tensor | None] = [None] * 6
    for (i, t), gi in zip(inputs, got, strict=True):
        res[i] = torch.zeros_like(t) if gi is None else gi
    return tuple(res)
