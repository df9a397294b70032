"""Pieces shared by the streamed kernel's forward (``kernels.py``), its hand-written backward
(``backward.py``) and its differentiable twin (``autodiff.py``): the plan, the causal layout, and
the per-segment feature / value / normaliser helpers.

The normaliser (see docs/variants/linear.md, *Normalisation*): with non-negative features,

    den_i = phi(q_i) . z_i,   ref_i = |phi(q_i)|_1 * |z_i|_1,   z_i = sum_{j allowed} phi(k_j)

so ``den_i / ref_i`` in [0, 1] is the row's overlap, independent of the scale of the features.
``out_i = num_i / max(den_i, eps * ref_i)``, and 0 when both are 0 (nothing to attend, or a relu
query with no positive feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import pointwise_features

__all__ = ["FEATURE_FNS", "Plan", "chunks", "feature_grad", "features", "keys", "layout", "normalise",
           "normalised", "rows", "spans", "state_norm", "store", "unchunk", "values"]

FEATURE_FNS = ("elu", "relu", "identity")  # identity: query and key already are features (FAVOR+)


@dataclass(frozen=True)
class Plan:
    """How one call of the streamed kernel runs (fixed per call)."""

    fmap: str  # one of FEATURE_FNS
    causal: bool
    chunk: int
    segment: int
    acc: torch.dtype  # dtype of all arithmetic (float32 for half inputs)
    eps: float  # relative floor of the normaliser (see the module docstring)
    offset: int = 0  # causal: query i sees keys j <= i + offset


def layout(lq: int, lk: int, plan: Plan) -> tuple[int, int, int, int]:
    """``(qs, ks, n, pre)``: queries ``qs + t`` and keys ``ks + t`` (t < n) meet position by
    position in the chunked causal pass; keys ``[0, pre)`` are in every query's past (all of them
    when not causal). Queries before ``qs`` see nothing; queries from ``qs + n`` on see the final
    state; keys from ``ks + n`` on are in nobody's past."""
    if not plan.causal:
        return 0, 0, 0, lk
    qs, ks = max(0, -plan.offset), max(0, plan.offset)
    return qs, ks, min(lq - qs, lk - ks), ks


def features(x: Tensor, plan: Plan, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(input in ``plan.acc``, its features) ``(B, H, S, E)``; features 0 where not allowed and
    contiguous (so that (B, H) folds into one dim). Either may alias ``x`` (identity map, or no
    dtype change): callers must not modify them in place, except elu's fresh features."""
    x = x.to(plan.acc)
    if plan.fmap == "identity":  # already features (FAVOR+)
        phi = x.masked_fill(~allowed, 0.0) if allowed is not None else x
    else:
        phi = pointwise_features(x, plan.fmap, allowed)
    return x, phi.contiguous()


def feature_grad(x: Tensor, phi: Tensor, d_phi: Tensor, plan: Plan, allowed: Tensor | None,
                 out: Tensor) -> None:
    """Write into ``out`` the gradient w.r.t. the input of ``features``, given that of the features."""
    if plan.fmap == "elu":  # d/dx (elu(x) + 1) is 1 for x > 0 and exp(x) = phi <= 1 otherwise: min(phi, 1)
        torch.mul(d_phi, phi.clamp_(max=1.0), out=out)  # phi is not needed afterwards
    elif plan.fmap == "relu":
        torch.mul(d_phi, x > 0, out=out)
    else:
        out.copy_(d_phi)
    if allowed is not None:
        out.masked_fill_(~allowed, 0.0)


def values(v: Tensor, plan: Plan, allowed: Tensor | None) -> Tensor:
    """``[v, 1]`` (B, H, S, Ev + 1) in ``plan.acc``; 0 (both parts) on masked keys."""
    v1 = F.pad(v.to(plan.acc), (0, 1), value=1.0)  # the ones column yields the normaliser
    return v1.masked_fill_(~allowed, 0.0) if allowed is not None else v1


def chunks(t: Tensor, c: int) -> Tensor:
    """``(B, H, S, D) -> (B*H*n, C, D)``, zero-padded to whole chunks (padded keys have phi = 0)."""
    b, h, s, d = t.shape
    pad = (-s) % c
    t = F.pad(t, (0, 0, 0, pad)) if pad else t
    return t.reshape(b * h * ((s + pad) // c), c, d)


def unchunk(t: Tensor, b: int, h: int, s: int) -> Tensor:
    """Inverse of ``chunks``: ``(B*H*n, C, D) -> (B, H, S, D)`` (a view)."""
    return t.view(b, h, -1, t.shape[-1])[:, :, :s]


def spans(start: int, stop: int, seg: int) -> list[tuple[int, int]]:
    """The segments ``(s0, s1)`` covering positions ``[start, stop)``, ``seg`` long (the last shorter)."""
    return [(s0, min(s0 + seg, stop)) for s0 in range(start, stop, seg)]


def keys(k: Tensor, v: Tensor, allowed: Tensor | None, plan: Plan, s0: int, s1: int
         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Keys ``s0:s1`` as forward and backward both build them: (key as used, its features, the
    key mask's rows, ``[v, 1]``), all ``(B, H|1, S, .)``."""
    km = rows(allowed, s0, s1)
    xk, pk = features(k[:, :, s0:s1], plan, km)
    return xk, pk, km, values(v[:, :, s0:s1], plan, km)


def rows(x: Any, s0: int, s1: int) -> Any:
    """Rows ``s0:s1`` of a (B, H|1, L, D) tensor; None and floats (broadcast scalars) unchanged."""
    return x[:, :, s0:s1] if isinstance(x, Tensor) else x


def store(dst: Tensor, s0: int, s1: int, src: Tensor, allowed: Tensor | None) -> None:
    """``dst[:, :, s0:s1] = src``, 0 where a key is not allowed."""
    part = dst[:, :, s0:s1]
    part.copy_(src)
    if allowed is not None:
        part.masked_fill_(~allowed, 0.0)


def state_norm(state: Tensor) -> Tensor:
    """``|z|_1`` of a running state ``[S | z]`` (..., F, Ev + 1) -> (...,): the ones column's sum."""
    return state[..., -1].sum(dim=-1)


def normalise(nd: Tensor, ref: Tensor | None, eps: float, out: Tensor, div: Tensor, live: Tensor,
              s0: int, s1: int) -> None:
    """``out[s0:s1] = num / max(den, eps * ref)`` from ``nd`` (B, H, S, Ev + 1) and ``ref``
    (B, H, S, 1; None: every row is known to be above the floor); records the divisor and
    ``live`` (den >= eps * ref: the divisor is den).

    A row whose den and floor are both 0 gets divisor 1 (its num is 0: output 0, finite gradients).
    """
    ev = out.shape[-1]
    den = nd[..., ev:]  # (B, H, S, 1)
    if ref is None:
        live[:, :, s0:s1] = True
        d = den.clone()
    else:
        thr = ref.mul_(eps)  # (B, H, S, 1); ref is a fresh temporary
        torch.ge(den, thr, out=live[:, :, s0:s1])
        d = torch.maximum(den, thr)  # NaN stays NaN: a poisoned row is not hidden
    div[:, :, s0:s1] = d.masked_fill_(d == 0, 1.0)
    torch.div(nd[..., :ev], div[:, :, s0:s1], out=out[:, :, s0:s1])


def normalised(nd: Tensor, ref: Tensor, eps: float) -> Tensor:
    """``num / max(den, eps * ref)`` of ``nd`` (..., Ev + 1) and ``ref`` (..., 1) with autograd ops
    (divisor 1 where both are 0); the gradient goes to den where den >= the floor, as in
    ``normalise`` and the hand-written backward."""
    ev = nd.shape[-1] - 1
    den, thr = nd[..., ev:], eps * ref  # (..., 1) each
    d = torch.where(den >= thr, den, thr)
    return nd[..., :ev] / torch.where(d == 0, torch.ones_like(d), d)
