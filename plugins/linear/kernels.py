"""Fast path of linear attention, O(L * F * Ev) time, streamed over the sequence.

    out_i = phi(q_i) . S_i / max(phi(q_i) . z_i, thr)      S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

with the sums over every real key (non-causal) or keys j <= i (causal). The normaliser rides along
as an extra all-ones value column, so numerator and denominator come out of the same matmuls.

Causal positions are cut into chunks of C: inside a chunk the masked quadratic form
tril(phi_q phi_k^T) V, across chunks a running prefix state phi_k^T [V, 1] (Katharopoulos et al.
2020, sec. 3.3, in its chunked form). Queries that see every key (non-causal, or causal queries past
the last key) read the final state with one matmul. Lower-right causal (``offset = Lk - Lq > 0``:
the queries are the last Lq positions) starts the chunked pass from the state of the keys before
the first query, like the state a decoder carries (``linear_attention_step``); with ``offset < 0``
the first ``-offset`` queries have no key to see and give 0.

Why streamed: the whole computation, feature maps included, walks the sequence in segments of a
few chunks (about 1 MB per tensor) and never materialises a full-length feature or score tensor.
Whole-sequence elementwise passes outgrow the caches (and glibc's 32 MB mmap threshold, so every
call page-faults fresh memory): with whole-sequence passes, elu, its backward and the normalising
division cost 2-4x more per token at L=32K than at 4K (2-core CPU), and the time grew like
L^1.2-1.4 over 4K..32K. FAVOR+ features, whose key stabiliser needs every key first, are computed
by the caller and streamed as they are (``identity``).

Backward walks the segments in reverse, recomputing features and chunk scores (cheap) from q, k,
v; only the chunk prefix states (F * (Ev + 1) per chunk) and the normaliser are kept, and nothing
at all when no input needs a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnreg.core import causal_mask

from .features import pointwise_features

__all__ = ["FEATURE_FNS", "key_state", "linear_attention", "linear_attention_step", "linear_weights",
           "segment_length", "state_readout"]

FEATURE_FNS = ("elu", "relu", "identity")  # identity: query and key already are features (FAVOR+)

# Elements per segment tensor (1 MB in float32): measured fastest of 2^17..2^21 on the 2-core CPU.
_SEGMENT_ELEMENTS = 1 << 20


def segment_length(heads: int, width: int, chunk: int, segment: int | None = None) -> int:
    """Positions per segment: ``segment`` (or, if None, about ``_SEGMENT_ELEMENTS`` elements of
    ``heads x width``) rounded up to whole chunks."""
    if segment is None:
        segment = _SEGMENT_ELEMENTS // max(1, heads * width)
    return max(1, -(-segment // chunk)) * chunk


@dataclass(frozen=True)
class _Plan:
    fmap: str  # one of FEATURE_FNS
    causal: bool
    chunk: int
    segment: int
    acc: torch.dtype  # dtype of all arithmetic (float32 for half inputs)
    offset: int = 0  # causal: query i sees keys j <= i + offset


def _layout(lq: int, lk: int, plan: _Plan) -> tuple[int, int, int, int]:
    """``(qs, ks, n, pre)``: queries ``qs + t`` and keys ``ks + t`` (t < n) meet position by
    position in the chunked causal pass; keys ``[0, pre)`` are in every query's past (all of them
    when not causal). Queries before ``qs`` see nothing; queries from ``qs + n`` on see the final
    state; keys from ``ks + n`` on are in nobody's past."""
    if not plan.causal:
        return 0, 0, 0, lk
    qs, ks = max(0, -plan.offset), max(0, plan.offset)
    return qs, ks, min(lq - qs, lk - ks), ks


def _plan(query: Tensor, key: Tensor, value: Tensor, fmap: str, is_causal: bool, chunk: int,
          acc: torch.dtype, segment: int | None, offset: int) -> _Plan:
    if fmap not in FEATURE_FNS:
        raise ValueError(f"unknown feature function {fmap!r}; expected one of {FEATURE_FNS}")
    b, h, lq = query.shape[:3]
    if is_causal:  # no chunk longer than the causal part (flops() counts min(C, n) too)
        chunk = min(chunk, max(1, min(lq, key.shape[2])))
    width = max(query.shape[-1], value.shape[-1] + 1)
    return _Plan(fmap, is_causal, chunk, segment_length(b * h, width, chunk, segment), acc, offset)


def linear_attention(
    query: Tensor, key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None,
    thr: float | Tensor, is_causal: bool, chunk: int, acc: torch.dtype, segment: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Normalised linear attention, ``(B, H, Lq, E), (B, H, Lk, E), (B, H, Lk, Ev) -> (B, H, Lq, Ev)``.

    ``fmap`` is applied to query and key inside (``identity``: they already are features, 0 on
    masked keys). ``key_allowed`` (B, 1, Lk, 1) bool marks real keys: masked keys and values never
    reach the arithmetic and get gradient 0. ``thr`` is the normaliser's lower bound, a float or a
    (B, H, Lq, 1) tensor. Causal: query i sees keys j <= i + ``offset`` (0: upper-left, SDPA's
    default; Lk - Lq: lower-right). Result in ``acc``.
    """
    plan = _plan(query, key, value, fmap, is_causal, chunk, acc, segment, offset)
    return _Streamed.apply(query, key, value, key_allowed, thr, None, plan)[0]


def linear_attention_step(
    query: Tensor, key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None,
    thr: float | Tensor, state: Tensor, chunk: int, acc: torch.dtype, segment: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal linear attention of T new positions after a prefix summarised by ``state``.

    ``state`` (B, H, F, Ev + 1) is ``sum phi(k_j) [v_j, 1]^T`` over the earlier keys; query t sees
    them and the new keys ``<= t``. Returns the output (B, H, T, Ev) and the state after the T
    keys, both in ``acc`` and both differentiable (also with respect to ``state``).
    """
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"a step needs as many queries as keys, got {query.shape[2]} and {key.shape[2]}")
    plan = _plan(query, key, value, fmap, True, chunk, acc, segment, 0)
    return _Streamed.apply(query, key, value, key_allowed, thr, state, plan)


def key_state(key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None, acc: torch.dtype,
              segment: int | None = None) -> Tensor:
    """``sum_j phi(k_j) [v_j, 1]^T`` over the real keys, (B, H, F, Ev + 1) in ``acc``: the state
    of a run of keys (what a process holding them contributes under context parallelism).
    Streamed like ``linear_attention``; differentiable w.r.t. key and value."""
    b, h, _, f = key.shape
    none = key.new_empty(b, h, 0, f)  # no query reads it here
    plan = _plan(none, key, value, fmap, False, 1, acc, segment, 0)
    return _Streamed.apply(none, key, value, key_allowed, 1.0, None, plan)[1]


def state_readout(query: Tensor, state: Tensor, fmap: str, thr: float | Tensor, acc: torch.dtype,
                  segment: int | None = None) -> Tensor:
    """Queries (B, H, Lq, E|F) that see every key summarised by ``state`` (B, H, F, Ev + 1):
    ``phi(q) S / max(phi(q) z, thr)``, (B, H, Lq, Ev) in ``acc``; differentiable w.r.t. query and
    state."""
    b, h = query.shape[:2]
    ev = state.shape[-1] - 1
    k, v = query.new_empty(b, h, 0, query.shape[-1]), query.new_empty(b, h, 0, ev)  # no key of its own
    plan = _plan(query, k, v, fmap, False, 1, acc, segment, 0)
    return _Streamed.apply(query, k, v, None, thr, state, plan)[0]


def _features(x: Tensor, plan: _Plan, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(input in ``plan.acc``, its features) ``(B, H, S, E)``; features 0 where not allowed and
    contiguous (so that (B, H) folds into one dim). Either may alias ``x`` (identity map, or no
    dtype change): callers must not modify them in place, except elu's fresh features."""
    x = x.to(plan.acc)
    if plan.fmap == "identity":  # already features (FAVOR+)
        phi = x.masked_fill(~allowed, 0.0) if allowed is not None else x
    else:
        phi = pointwise_features(x, plan.fmap, allowed)
    return x, phi.contiguous()


def _feature_grad(x: Tensor, phi: Tensor, d_phi: Tensor, plan: _Plan, allowed: Tensor | None,
                  out: Tensor) -> None:
    """Write into ``out`` the gradient w.r.t. the input of ``_features``, given that of the features."""
    if plan.fmap == "elu":  # d/dx (elu(x) + 1) is 1 for x > 0 and exp(x) = phi <= 1 otherwise: min(phi, 1)
        torch.mul(d_phi, phi.clamp_(max=1.0), out=out)  # phi is not needed afterwards
    elif plan.fmap == "relu":
        torch.mul(d_phi, x > 0, out=out)
    else:
        out.copy_(d_phi)
    if allowed is not None:
        out.masked_fill_(~allowed, 0.0)


def _values(v: Tensor, plan: _Plan, allowed: Tensor | None) -> Tensor:
    """``[v, 1]`` (B, H, S, Ev + 1) in ``plan.acc``; 0 (both parts) on masked keys."""
    v1 = F.pad(v.to(plan.acc), (0, 1), value=1.0)  # the ones column yields the normaliser
    return v1.masked_fill_(~allowed, 0.0) if allowed is not None else v1


def _chunks(t: Tensor, c: int) -> Tensor:
    """``(B, H, S, D) -> (B*H*n, C, D)``, zero-padded to whole chunks (padded keys have phi = 0)."""
    b, h, s, d = t.shape
    pad = (-s) % c
    t = F.pad(t, (0, 0, 0, pad)) if pad else t
    return t.reshape(b * h * ((s + pad) // c), c, d)


def _unchunk(t: Tensor, b: int, h: int, s: int) -> Tensor:
    """Inverse of ``_chunks``: ``(B*H*n, C, D) -> (B, H, S, D)`` (a view)."""
    return t.view(b, h, -1, t.shape[-1])[:, :, :s]


def _spans(start: int, stop: int, seg: int) -> list[tuple[int, int]]:
    """The segments ``(s0, s1)`` covering positions ``[start, stop)``, ``seg`` long (the last shorter)."""
    return [(s0, min(s0 + seg, stop)) for s0 in range(start, stop, seg)]


def _keys(k: Tensor, v: Tensor, allowed: Tensor | None, plan: _Plan, s0: int, s1: int
          ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Keys ``s0:s1`` as forward and backward both build them: (key as used, its features, the
    key mask's rows, ``[v, 1]``), all ``(B, H|1, S, .)``."""
    km = _rows(allowed, s0, s1)
    xk, pk = _features(k[:, :, s0:s1], plan, km)
    return xk, pk, km, _values(v[:, :, s0:s1], plan, km)


def _rows(x: Any, s0: int, s1: int) -> Any:
    """Rows ``s0:s1`` of a (B, H|1, L, D) tensor; None and floats (broadcast scalars) unchanged."""
    return x[:, :, s0:s1] if isinstance(x, Tensor) else x


class _Streamed(torch.autograd.Function):
    """Linear attention over segments, forward and a hand-written backward (see module docstring).

    Autograd of the same ops is correct too, but keeps every full-length intermediate alive and
    spends most of its time in zero-fills, slices and copies. Outputs: the attention output and
    the final running state (keys ``[0, ks + n)``, after ``init``), both differentiable.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None,  # type: ignore[override]
                thr: float | Tensor, init: Tensor | None, plan: _Plan) -> tuple[Tensor, Tensor]:
        b, h, lq, f = q.shape
        lk, ev = k.shape[2], v.shape[-1]
        g, c, seg = b * h, plan.chunk, plan.segment
        qs, ks, n_sq, pre = _layout(lq, lk, plan)
        out = torch.empty(b, h, lq, ev, dtype=plan.acc, device=q.device)  # (B, H, Lq, Ev)
        div = torch.empty(b, h, lq, 1, dtype=plan.acc, device=q.device)  # the normaliser used
        live = torch.empty(b, h, lq, 1, dtype=torch.bool, device=q.device)  # normaliser >= thr
        if init is None:  # sum phi_k^T [v, 1] so far (G, F, Ev + 1)
            run = torch.zeros(g, f, ev + 1, dtype=plan.acc, device=q.device)
        else:
            run = init.to(plan.acc).reshape(g, f, ev + 1).clone()
        keep = any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[5]  # will there be a backward
        for s0, s1 in _spans(0, pre, seg):  # keys in every query's past
            _, pk, _, v1 = _keys(k, v, allowed, plan, s0, s1)
            run.baddbmm_(pk.reshape(g, s1 - s0, f).mT, v1.reshape(g, s1 - s0, ev + 1))
        prefixes = []
        for s0, s1 in _spans(0, n_sq, seg):  # query qs + t meets key ks + t
            _, pk, _, v1 = _keys(k, v, allowed, plan, ks + s0, ks + s1)
            q3 = _chunks(_features(q[:, :, qs + s0:qs + s1], plan, None)[1], c)  # (GN, C, F)
            k3, v3 = _chunks(pk, c), _chunks(v1, c)  # (GN, C, F), (GN, C, Ev + 1)
            n = q3.shape[0] // g
            states = torch.bmm(k3.mT, v3).view(g, n, f, ev + 1)  # each chunk's phi_k^T [v, 1]
            prefix = torch.empty_like(states)  # (G, n, F, Ev + 1): state before each chunk
            prefix[:, 0] = run
            if n > 1:
                torch.cumsum(states[:, :-1], dim=1, out=prefix[:, 1:])
                prefix[:, 1:] += run[:, None]
            run = prefix[:, -1] + states[:, -1]
            scores = torch.bmm(q3, k3.mT).tril_()  # (GN, C, C): intra-chunk, causal
            nd = torch.bmm(scores, v3).baddbmm_(q3, prefix.view(g * n, f, ev + 1))  # (GN, C, Ev + 1)
            a0, a1 = qs + s0, qs + s1
            _normalise(_unchunk(nd, b, h, s1 - s0), _rows(thr, a0, a1), out, div, live, a0, a1)
            if keep:
                prefixes.append(prefix)
        if qs:  # lower-right with Lq > Lk: the first queries have no key at all
            out[:, :, :qs] = 0.0
            div[:, :, :qs] = 1.0
            live[:, :, :qs] = False
        for s0, s1 in _spans(qs + n_sq, lq, seg):  # queries that see every key (in the past, if causal)
            pq = _features(q[:, :, s0:s1], plan, None)[1].reshape(g, s1 - s0, f)  # (G, S, F)
            nd = torch.bmm(pq, run).view(b, h, s1 - s0, ev + 1)  # (B, H, S, Ev + 1)
            _normalise(nd, _rows(thr, s0, s1), out, div, live, s0, s1)
        if keep:
            ctx.save_for_backward(q, k, v, allowed, out, div, live, run, *prefixes)
        ctx.plan = plan
        return out, run.view(b, h, f, ev + 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, grad_state: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, allowed, out, div, live, run, *prefixes = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, lq, f = q.shape
        lk, ev = k.shape[2], v.shape[-1]
        g, c, seg = b * h, plan.chunk, plan.segment
        qs, ks, n_sq, pre = _layout(lq, lk, plan)
        grad = grad.to(plan.acc)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        # Keys past the last query get no gradient in causal mode: they are in everyone's future.
        new = torch.zeros_like if ks + n_sq < lk and plan.causal else torch.empty_like
        dq = torch.empty_like(q) if need_q else None
        dk = new(k) if need_k else None
        dv = new(v) if need_v else None
        if dq is not None and qs:
            dq[:, :, :qs] = 0.0  # queries with no key: output 0 whatever they hold

        def g_num_den(s0: int, s1: int) -> Tensor:  # (B, H, S, Ev + 1): gradient of [num, den]
            gn = torch.empty(b, h, s1 - s0, ev + 1, dtype=plan.acc, device=q.device)
            torch.div(grad[:, :, s0:s1], div[:, :, s0:s1], out=gn[..., :ev])
            g_den = -(gn[..., :ev] * out[:, :, s0:s1]).sum(dim=-1, keepdim=True)  # (B, H, S, 1)
            gn[..., ev:] = g_den.masked_fill_(~live[:, :, s0:s1], 0.0)  # eps was the divisor: constant
            return gn

        # Gradient of the state read after a position, starting with that of the returned state.
        d_run = grad_state.to(plan.acc).reshape(g, f, ev + 1).clone()  # (G, F, Ev + 1)
        for s0, s1 in _spans(qs + n_sq, lq, seg):
            xq, pq = _features(q[:, :, s0:s1], plan, None)  # (B, H, S, F)
            gn = g_num_den(s0, s1).view(g, s1 - s0, ev + 1)
            d_run.baddbmm_(pq.reshape(g, s1 - s0, f).mT, gn)
            if dq is not None:
                d_pq = torch.bmm(gn, run.mT).view(b, h, s1 - s0, f)
                _feature_grad(xq, pq, d_pq, plan, None, dq[:, :, s0:s1])
        for (s0, s1), prefix in zip(reversed(_spans(0, n_sq, seg)), reversed(prefixes), strict=True):
            a0, a1, k0, k1 = qs + s0, qs + s1, ks + s0, ks + s1  # query rows, key rows
            xq, pq = _features(q[:, :, a0:a1], plan, None)
            xk, pk, km, v1 = _keys(k, v, allowed, plan, k0, k1)
            q3, k3, v3 = _chunks(pq, c), _chunks(pk, c), _chunks(v1, c)  # (GN, C, F|F|Ev + 1)
            g3 = _chunks(g_num_den(a0, a1), c)  # (GN, C, Ev + 1)
            n = q3.shape[0] // g
            d_scores = torch.bmm(g3, v3.mT).tril_()  # (GN, C, C)
            d_prefix = torch.bmm(q3.mT, g3).view(g, n, f, ev + 1)
            # A chunk's state feeds the prefix of every later chunk, here and in later segments.
            d_states = torch.empty_like(d_prefix)  # (G, n, F, Ev + 1)
            d_states[:, -1] = d_run
            if n > 1:
                d_states[:, :-1] = d_prefix[:, 1:].flip(1).cumsum(dim=1).flip(1) + d_run[:, None]
            d_run = d_run + d_prefix.sum(dim=1)
            ds3 = d_states.view(g * n, f, ev + 1)
            s = s1 - s0
            # Every product first: _feature_grad may overwrite pq / pk (q3 / k3 are their views).
            d_pq = d_pk = None
            if dq is not None:
                d_pq = torch.bmm(d_scores, k3).baddbmm_(g3, prefix.view(g * n, f, ev + 1).mT)  # (GN, C, F)
            if dk is not None:
                d_pk = torch.bmm(d_scores.mT, q3).baddbmm_(v3, ds3.mT)  # (GN, C, F)
            if dv is not None:
                scores = torch.bmm(q3, k3.mT).tril_()  # (GN, C, C), recomputed
                d_v = torch.bmm(scores.mT, g3).baddbmm_(k3, ds3)  # (GN, C, Ev + 1)
                _store(dv, k0, k1, _unchunk(d_v, b, h, s)[..., :ev], km)
            if d_pq is not None:
                _feature_grad(xq, pq, _unchunk(d_pq, b, h, s), plan, None, dq[:, :, a0:a1])
            if d_pk is not None:
                _feature_grad(xk, pk, _unchunk(d_pk, b, h, s), plan, km, dk[:, :, k0:k1])
        # d_run is now the gradient of the state before the causal pass: keys [0, pre) and init.
        if need_k or need_v:
            for s0, s1 in _spans(0, pre, seg):
                xk, pk, km, v1 = _keys(k, v, allowed, plan, s0, s1)
                v1 = v1.reshape(g, s1 - s0, ev + 1)
                if dv is not None:  # before _feature_grad, which may overwrite pk
                    d_v = torch.bmm(pk.reshape(g, s1 - s0, f), d_run[..., :ev]).view(b, h, s1 - s0, ev)
                    _store(dv, s0, s1, d_v, km)
                if dk is not None:
                    d_pk = torch.bmm(v1, d_run.mT).view(b, h, s1 - s0, f)
                    _feature_grad(xk, pk, d_pk, plan, km, dk[:, :, s0:s1])
        d_init = d_run.view(b, h, f, ev + 1) if ctx.needs_input_grad[5] else None
        return dq, dk, dv, None, None, d_init, None


def _store(dst: Tensor, s0: int, s1: int, src: Tensor, allowed: Tensor | None) -> None:
    """``dst[:, :, s0:s1] = src``, 0 where a key is not allowed."""
    part = dst[:, :, s0:s1]
    part.copy_(src)
    if allowed is not None:
        part.masked_fill_(~allowed, 0.0)


def _normalise(nd: Tensor, thr: float | Tensor, out: Tensor, div: Tensor, live: Tensor,
               s0: int, s1: int) -> None:
    """``out[s0:s1] = num / max(den, thr)`` from ``nd`` (B, H, S, Ev + 1); records divisor and ``live``."""
    ev = out.shape[-1]
    den = nd[..., ev:]  # (B, H, S, 1)
    torch.ge(den, thr, out=live[:, :, s0:s1])
    d = torch.where(live[:, :, s0:s1], den, thr)  # (B, H, S, 1)
    div[:, :, s0:s1] = d
    torch.div(nd[..., :ev], d, out=out[:, :, s0:s1])


def linear_weights(
    phi_q: Tensor, phi_k: Tensor, thr: float | Tensor, is_causal: bool, offset: int = 0
) -> Tensor:
    """The dense normalised weights (B, H, Lq, Lk) of the same computation (O(Lq * Lk))."""
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Lq, Lk), 0 on masked keys
    if is_causal:
        allowed = causal_mask(scores.shape[-2], scores.shape[-1], scores.device, offset)  # (Lq, Lk)
        scores = scores.masked_fill(~allowed, 0.0)
    den = scores.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    if isinstance(thr, Tensor):
        return scores / torch.maximum(den, thr)
    return scores / den.clamp_min(thr)
