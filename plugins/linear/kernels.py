"""Fast path of linear attention, O(L * F * Ev) time, streamed over the sequence.

    out_i = phi(q_i) . S_i / max(phi(q_i) . z_i, eps * |phi(q_i)|_1 * |z_i|_1)
    S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

with the sums over every real key (non-causal) or keys j <= i (causal). The normaliser rides along
as an extra all-ones value column, so numerator and denominator come out of the same matmuls; the
floor is relative (``segments.py``), so the result does not depend on the scale of the features.

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

Masked positions never leak, whatever they hold (NaN and inf included): padded keys are masked
before any arithmetic; a future value inside a chunk would meet its zero score in
``tril(scores) @ V`` (0 * NaN = NaN), so when the running state turns out non-finite the causal
pass is redone with the non-finite value rows kept out of the rows before them (``_intra``). The
backward (``backward.py``) keeps rows with no upstream gradient and a non-finite output, and keys
only such rows read, out of the arithmetic.

Backward walks the segments in reverse, recomputing features and chunk scores (cheap) from q, k,
v; only the chunk prefix states (F * (Ev + 1) per chunk) and the normaliser are kept, and nothing
at all when no input needs a gradient. Double backward (``create_graph=True``) differentiates a
plain-torch recomputation instead (``autodiff.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnreg.core import causal_mask, known

from .autodiff import autodiff_backward
from .backward import streamed_backward
from .segments import (
    FEATURE_FNS,
    Plan,
    chunks,
    features,
    keys,
    layout,
    normalise,
    spans,
    state_norm,
    unchunk,
)

__all__ = ["FEATURE_FNS", "key_state", "linear_attention", "linear_attention_step", "linear_weights",
           "segment_length", "state_readout"]

# Elements per segment tensor (1 MB in float32): measured fastest of 2^17..2^21 on the 2-core CPU.
_SEGMENT_ELEMENTS = 1 << 20


def segment_length(heads: int, width: int, chunk: int, segment: int | None = None) -> int:
    """Positions per segment: ``segment`` (or, if None, about ``_SEGMENT_ELEMENTS`` elements of
    ``heads x width``) rounded up to whole chunks."""
    if segment is None:
        segment = _SEGMENT_ELEMENTS // max(1, heads * width)
    return max(1, -(-segment // chunk)) * chunk


def _plan(query: Tensor, key: Tensor, value: Tensor, fmap: str, is_causal: bool, chunk: int,
          acc: torch.dtype, segment: int | None, offset: int, eps: float) -> Plan:
    if fmap not in FEATURE_FNS:
        raise ValueError(f"unknown feature function {fmap!r}; expected one of {FEATURE_FNS}")
    b, h, lq = query.shape[:3]
    if is_causal:  # no chunk longer than the causal part (flops() counts min(C, n) too)
        chunk = min(chunk, max(1, min(lq, key.shape[2])))
    width = max(query.shape[-1], value.shape[-1] + 1)
    return Plan(fmap, is_causal, chunk, segment_length(b * h, width, chunk, segment), acc, eps, offset)


def linear_attention(
    query: Tensor, key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None,
    eps: float, is_causal: bool, chunk: int, acc: torch.dtype, segment: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Normalised linear attention, ``(B, H, Lq, E), (B, H, Lk, E), (B, H, Lk, Ev) -> (B, H, Lq, Ev)``.

    ``fmap`` is applied to query and key inside (``identity``: they already are features, 0 on
    masked keys). ``key_allowed`` (B, 1, Lk, 1) bool marks real keys: masked keys and values never
    reach the arithmetic and get gradient 0. ``eps`` is the relative floor of the normaliser.
    Causal: query i sees keys j <= i + ``offset`` (0: upper-left, SDPA's default; Lk - Lq:
    lower-right). Result in ``acc``.
    """
    plan = _plan(query, key, value, fmap, is_causal, chunk, acc, segment, offset, eps)
    return _Streamed.apply(query, key, value, key_allowed, None, plan)[0]


def linear_attention_step(
    query: Tensor, key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None,
    eps: float, state: Tensor, chunk: int, acc: torch.dtype, segment: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal linear attention of T new positions after a prefix summarised by ``state``.

    ``state`` (B, H, F, Ev + 1) is ``sum phi(k_j) [v_j, 1]^T`` over the earlier keys; query t sees
    them and the new keys ``<= t``. Returns the output (B, H, T, Ev) and the state after the T
    keys, both in ``acc`` and both differentiable (also with respect to ``state``).
    """
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"a step needs as many queries as keys, got {query.shape[2]} and {key.shape[2]}")
    plan = _plan(query, key, value, fmap, True, chunk, acc, segment, 0, eps)
    return _Streamed.apply(query, key, value, key_allowed, state, plan)


def key_state(key: Tensor, value: Tensor, fmap: str, key_allowed: Tensor | None, acc: torch.dtype,
              segment: int | None = None) -> Tensor:
    """``sum_j phi(k_j) [v_j, 1]^T`` over the real keys, (B, H, F, Ev + 1) in ``acc``: the state
    of a run of keys (what a process holding them contributes under context parallelism).
    Streamed like ``linear_attention``; differentiable w.r.t. key and value."""
    b, h, _, f = key.shape
    none = key.new_empty(b, h, 0, f)  # no query reads it here (so no floor either)
    plan = _plan(none, key, value, fmap, False, 1, acc, segment, 0, 0.0)
    return _Streamed.apply(none, key, value, key_allowed, None, plan)[1]


def state_readout(query: Tensor, state: Tensor, fmap: str, eps: float, acc: torch.dtype,
                  segment: int | None = None) -> Tensor:
    """Queries (B, H, Lq, E|F) that see every key summarised by ``state`` (B, H, F, Ev + 1):
    ``phi(q) S / max(phi(q) z, eps |phi(q)|_1 |z|_1)``, (B, H, Lq, Ev) in ``acc``;
    differentiable w.r.t. query and state."""
    b, h = query.shape[:2]
    ev = state.shape[-1] - 1
    k, v = query.new_empty(b, h, 0, query.shape[-1]), query.new_empty(b, h, 0, ev)  # no key of its own
    plan = _plan(query, k, v, fmap, False, 1, acc, segment, 0, eps)
    return _Streamed.apply(query, k, v, None, state, plan)[0]


def _intra(scores: Tensor, v3: Tensor, careful: bool) -> Tensor:
    """``tril(scores) @ v3`` of each chunk (GN, C, Ev + 1). ``careful``: a row before a non-finite
    value row of its chunk is computed without that row (its zero score times NaN or inf would be
    NaN); rows at or after it keep the plain product, so a poisoned row stays poisoned."""
    nd = torch.bmm(scores, v3)
    if careful:
        bad = ~torch.isfinite(v3).all(dim=-1)  # (GN, C)
        if known(bad.any(), on_meta=False):
            seen = bad.to(torch.int8).cumsum(dim=1) > 0  # (GN, C): a bad value at or before the row
            clean = torch.bmm(scores, v3.masked_fill(bad[..., None], 0.0))
            nd = torch.where(seen[..., None], nd, clean)
    return nd


def _forward(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, init: Tensor | None,
             plan: Plan, keep: bool, careful: bool) -> tuple[Tensor, ...]:
    """One pass: (out, divisor, live, final state (G, F, Ev + 1), chunk prefixes if ``keep``)."""
    b, h, lq, f = q.shape
    lk, ev = k.shape[2], v.shape[-1]
    g, c, seg = b * h, plan.chunk, plan.segment
    qs, ks, n_sq, pre = layout(lq, lk, plan)
    out = torch.empty(b, h, lq, ev, dtype=plan.acc, device=q.device)  # (B, H, Lq, Ev)
    div = torch.empty(b, h, lq, 1, dtype=plan.acc, device=q.device)  # the normaliser used
    live = torch.empty(b, h, lq, 1, dtype=torch.bool, device=q.device)  # den >= eps * ref
    if init is None:  # sum phi_k^T [v, 1] so far (G, F, Ev + 1)
        run = torch.zeros(g, f, ev + 1, dtype=plan.acc, device=q.device)
    else:
        run = init.to(plan.acc).reshape(g, f, ev + 1).clone()
    for s0, s1 in spans(0, pre, seg):  # keys in every query's past
        _, pk, _, v1 = keys(k, v, allowed, plan, s0, s1)
        run.baddbmm_(pk.reshape(g, s1 - s0, f).mT, v1.reshape(g, s1 - s0, ev + 1))
    prefixes = []
    for s0, s1 in spans(0, n_sq, seg):  # query qs + t meets key ks + t
        _, pk, _, v1 = keys(k, v, allowed, plan, ks + s0, ks + s1)
        pq = features(q[:, :, qs + s0:qs + s1], plan, None)[1]  # (B, H, S, F)
        start, s = run, s1 - s0
        q3, k3, v3 = chunks(pq, c), chunks(pk, c), chunks(v1, c)  # (GN, C, F|F|Ev + 1)
        n = q3.shape[0] // g
        states = torch.bmm(k3.mT, v3).view(g, n, f, ev + 1)  # each chunk's phi_k^T [v, 1]
        prefix = torch.empty_like(states)  # (G, n, F, Ev + 1): state before each chunk
        prefix[:, 0] = run
        if n > 1:
            torch.cumsum(states[:, :-1], dim=1, out=prefix[:, 1:])
            prefix[:, 1:] += run[:, None]
        run = prefix[:, -1] + states[:, -1]
        scores = torch.bmm(q3, k3.mT).tril_()  # (GN, C, C): intra-chunk, causal
        nd = _intra(scores, v3, careful).baddbmm_(q3, prefix.view(g * n, f, ev + 1))  # (GN, C, Ev + 1)
        nd4, a0 = unchunk(nd, b, h, s), qs + s0  # (B, H, S, Ev + 1)
        r = min(s, c * _chunks_below_floor(prefix, run, plan.eps))  # rows that need the norms
        if r:  # ref = |phi_q|_1 |z_i|_1: the state's |z|_1 before the segment plus its keys <= i
            ref = pk[:, :, :r].sum(dim=-1, keepdim=True).cumsum_(dim=2)  # (B, H, r, 1)
            ref.add_(state_norm(start).view(b, h, 1, 1)).mul_(pq[:, :, :r].sum(dim=-1, keepdim=True))
            normalise(nd4[:, :, :r], ref, plan.eps, out, div, live, a0, a0 + r)
        if r < s:
            normalise(nd4[:, :, r:], None, plan.eps, out, div, live, a0 + r, a0 + s)
        if keep:
            prefixes.append(prefix)
    if qs:  # lower-right with Lq > Lk: the first queries have no key at all
        out[:, :, :qs] = 0.0
        div[:, :, :qs] = 1.0
        live[:, :, :qs] = True
    full = None if _all_live(run, run, plan.eps) else state_norm(run).view(b, h, 1, 1)  # |z|_1
    for s0, s1 in spans(qs + n_sq, lq, seg):  # queries that see every key (in the past, if causal)
        pq = features(q[:, :, s0:s1], plan, None)[1]  # (B, H, S, F)
        nd = torch.bmm(pq.reshape(g, s1 - s0, f), run).view(b, h, s1 - s0, ev + 1)  # (B, H, S, Ev + 1)
        ref = None if full is None else pq.sum(dim=-1, keepdim=True).mul_(full)
        normalise(nd, ref, plan.eps, out, div, live, s0, s1)
    return out, div, live, run, *prefixes


def _clears(start: Tensor, end: Tensor, eps: float) -> Tensor:
    """Whether every row reading a state between ``start`` (G, ..., F, Ev + 1) and ``end``
    (G, F, Ev + 1) is above the floor, per leading index of ``start`` except G: then the norms
    need not be computed (the result is the same bit for bit).

    A row's z_i lies between the two states, entry by entry (features are >= 0), so
    den_i >= |phi_q|_1 min_f z_start,f and the floor eps |phi_q|_1 |z_i|_1 <= eps |phi_q|_1 |z_end|_1.
    The factor 2 covers rounding; with eps = 1e-20 only a state with a (nearly) empty feature
    fails (relu; before the first chunk), and NaN fails.
    """
    z_min = start[..., -1].amin(dim=-1)  # (G, ...)
    bound = 2.0 * eps * state_norm(end).view(-1, *([1] * (z_min.dim() - 1)))
    return (z_min >= bound).all(dim=0)


def _all_live(start: Tensor, end: Tensor, eps: float) -> bool:
    """``_clears`` for one state between ``start`` and ``end`` (G, F, Ev + 1)."""
    return known(_clears(start, end, eps), on_meta=False)


def _chunks_below_floor(prefix: Tensor, end: Tensor, eps: float) -> int:
    """How many leading chunks of a segment (prefix states (G, n, F, Ev + 1)) may have a row
    below the floor: up to the last chunk whose prefix does not clear it (usually only the
    sequence's first chunk, which starts from an empty state)."""
    if prefix.device.type == "meta":  # no values: every chunk takes the general path
        return prefix.shape[1]
    bad = (~_clears(prefix, end, eps)).nonzero()  # (k, 1)
    return int(bad[-1, 0]) + 1 if bad.numel() else 0


class _Streamed(torch.autograd.Function):
    """Linear attention over segments, forward and a hand-written backward (see module docstring).

    Autograd of the same ops is correct too, but keeps every full-length intermediate alive and
    spends most of its time in zero-fills, slices and copies. Outputs: the attention output and
    the final running state (keys ``[0, ks + n)``, after ``init``), both differentiable, twice
    (``autodiff.py`` serves ``create_graph=True``).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None,  # type: ignore[override]
                init: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor]:
        keep = any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[4]  # will there be a backward
        res = _forward(q, k, v, allowed, init, plan, keep, careful=False)
        # A non-finite running state means a NaN / inf key or value took part (or the sums
        # overflowed): redo the causal pass so that no such value reaches the rows before it.
        if plan.causal and not known(torch.isfinite(res[3]).all(), on_meta=True):
            res = _forward(q, k, v, allowed, init, plan, keep, careful=True)
        out, run = res[0], res[3]
        if keep:
            ctx.save_for_backward(q, k, v, allowed, init, *res)
        ctx.plan = plan
        b, h, f, ev = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
        return out, run.view(b, h, f, ev + 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_state: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable again
            return autodiff_backward(ctx, grad, grad_state)
        return streamed_backward(ctx, grad, grad_state)


def linear_weights(phi_q: Tensor, phi_k: Tensor, eps: float, is_causal: bool, offset: int = 0) -> Tensor:
    """The dense normalised weights (B, H, Lq, Lk) of the same computation (O(Lq * Lk));
    ``phi_k`` is 0 on masked keys."""
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, Lq, Lk), 0 on masked keys
    norms = phi_k.sum(dim=-1)[..., None, :].expand_as(scores)  # (B, H, Lq, Lk): |phi(k_j)|_1
    if is_causal:
        allowed = causal_mask(scores.shape[-2], scores.shape[-1], scores.device, offset)  # (Lq, Lk)
        scores = scores.masked_fill(~allowed, 0.0)
        norms = norms.masked_fill(~allowed, 0.0)
    den = scores.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    thr = eps * phi_q.sum(dim=-1, keepdim=True) * norms.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    d = torch.where(den >= thr, den, thr)
    return scores / torch.where(d == 0, torch.ones_like(d), d)

