"""Checks of incremental decoding (``Capabilities.decoding``): decode == causal full forward
(outputs and gradients), lower-right causal alignment, state reordering. Input errors of the
decoding API: ``_checks_decoding_errors``.

A variant gets these for free by declaring ``decoding=True``: they only use the public
interface (``init_state``, ``decode``, ``forward(..., causal_alignment="lower_right")``) and
``DecodeState``'s generic methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnreg.core import Attention, DecodeState

from ._asserts import TOLERANCES, assert_close, assert_finite, assert_zero, expect_raises, sizes_of
from ._framework import EV, LONG, B, E, Subject, check, heads_for
from ._outcomes import CheckFailure

__all__ = ["SHORT", "decode_tol", "left_padding", "run_decode", "schedules"]

SHORT = 13
# Chunk lengths of one decode run: a prefill of a prefix, single-token steps, one multi-token
# chunk, more single steps. Prime/odd lengths, so no call boundary or prefix length is a
# multiple of a block, chunk or window size the variants use; the second short schedule starts
# from an empty state with single tokens (generation from a BOS token).
_SCHEDULES = {SHORT: ((5, 1, 1, 5, 1), (1, 1, 3, 7, 1)), LONG: ((67, 1, 1, 1, 59, 1, 1),)}


def schedules(n: int) -> tuple[tuple[int, ...], ...]:
    """The decode-call lengths used for a sequence of ``n`` positions (each sums to ``n``)."""
    return _SCHEDULES[n]


def decode_tol(s: Subject) -> tuple[float, float]:
    """Decoding equals the full forward to 1e-10 (times max(1, max|want|)) in float64, else the
    reference dtype's tolerance."""
    return (1e-10, 0.0) if s.dtype == torch.float64 else TOLERANCES[s.dtype]


def left_padding(s: Subject, b: int, n: int, prefix: int) -> Tensor:
    """key_mask (b, n), True = real token, rows padded differently: row 0 is real but for one
    hole at position 2, row 1 is left-padded by 3, row 2 by ``prefix + 1`` (the whole first
    decode call is padding), further rows by 2*i."""
    km = torch.ones(b, n, dtype=torch.bool)
    km[0, 2] = False
    for i in range(1, b):
        km[i, : (3 if i == 1 else prefix + 1 if i == 2 else 2 * i)] = False
    return km.to(s.device)


def run_decode(s: Subject, m: Attention, state: DecodeState, q: Tensor, k: Tensor, v: Tensor,
               km: Tensor | None, segments: Sequence[int], start: int = 0) -> tuple[Tensor, DecodeState]:
    """Decode positions ``start, start + sum(segments)`` of q/k/v (B, H|Hkv, L, E|Ev) in calls
    of ``segments`` tokens; returns the outputs (B, H, T, Ev) concatenated and the last state.

    Calls whose slice of ``km`` is all True pass ``key_mask=None``, so that calls with and
    without a key_mask are mixed. Each call's output shape and ``state.length`` are checked.
    """
    outs = []
    pos = start
    for t in segments:
        sl = slice(pos, pos + t)
        kmt = None if km is None or bool(km[:, sl].all()) else km[:, sl]
        s.last_sizes = sizes_of(q, k, v) + f" (decode call of positions {pos}..{pos + t - 1})"
        out, state = m.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, key_mask=kmt)
        want = (q.shape[0], q.shape[1], t, v.shape[-1])
        if tuple(out.shape) != want:
            raise CheckFailure(f"decode output shape {tuple(out.shape)}, expected {want} ({s.last_sizes})")
        if not isinstance(state, DecodeState):
            raise CheckFailure(f"decode returned a {type(state).__name__} as its state, not a DecodeState")
        pos += t
        if state.length != pos:
            raise CheckFailure(f"state.length = {state.length} after decoding positions 0..{pos - 1}, "
                               f"expected {pos} ({s.last_sizes})")
        outs.append(out)
    return torch.cat(outs, dim=2), state  # (B, H, sum(segments), Ev)


def _padding_cases(s: Subject, b: int, n: int, prefix: int) -> list[tuple[str, Tensor | None]]:
    out: list[tuple[str, Tensor | None]] = [("no padding", None)]
    if s.caps.key_mask:
        out.append(("left padding via key_mask", left_padding(s, b, n, prefix)))
    return out


@check("decode_matches_forward", "decoding", requires=("decoding",))
def decode_matches_forward(s: Subject) -> None:
    """``init_state`` (``max_length`` = the total length) + ``decode`` in calls of a prefill of a
    random prefix, single tokens and one multi-token chunk (lengths 13 and 131, B=3, odd call
    boundaries; one schedule starts from single tokens) equals the causal full forward over the
    whole sequence to 1e-10 in float64, without padding and with left padding via ``key_mask``
    (rows padded by different amounts, one whose whole prefill is padding, one with a hole);
    every call returns (B, H, T, Ev) and advances ``state.length`` by T."""
    b = 3
    for n in (SHORT, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(b, h, n, ev=EV, seed=n + 20)
        for segments in schedules(n):
            for label, km in _padding_cases(s, b, n, segments[0]):
                want = m(q, k, v, is_causal=True, key_mask=km)  # (B, H, L, Ev)
                state = m.init_state(b, h, E, EV, dtype=s.dtype, device=s.device, max_length=n)
                got, _ = run_decode(s, m, state, q, k, v, km, segments)
                assert_close(got, want, what=f"decode in calls of {segments} tokens vs the causal full "
                             f"forward ({label})", sizes=sizes_of(q, k, v), dtype=s.dtype, tol=decode_tol(s))


@check("decode_gradients", "decoding", requires=("decoding",))
def decode_gradients(s: Subject) -> None:
    """Backward through decoding: the gradients w.r.t. query, key, value and the module's
    parameters of ``init_state`` + ``decode`` (the schedules of ``decode_matches_forward``: a
    prefill, single tokens and a multi-token chunk; lengths 13 and 131, B=3, an upstream
    gradient on every output) equal those of the causal full forward to 1e-10 in float64,
    without and with left padding via ``key_mask``, when everything requires grad and when only
    the query does (for learnable variants also when only the parameters do): an in-place write
    into a cache that an earlier call saved for backward fails here."""
    b = 3
    for n in (SHORT, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        qkv = s.inputs(b, h, n, ev=EV, seed=n + 50)
        g = s.randn(b, h, n, EV, seed=n + 51)  # (B, H, L, Ev) upstream gradient
        cases = [("query, key, value and parameters", ("query", "key", "value"), True),
                 ("only the query", ("query",), False)]
        if any(p.requires_grad for p in m.parameters()):
            cases.append(("only the parameters", (), True))
        segments = schedules(n)[0]
        sz = sizes_of(*qkv)
        for label, km in _padding_cases(s, b, n, segments[0]):
            for who, inputs, params in cases:
                want = _gradients(s, m, qkv, g, km, inputs, params, None)
                got = _gradients(s, m, qkv, g, km, inputs, params, segments)
                for name, gw in want.items():
                    what = (f"gradient w.r.t. {name} through decode in calls of {segments} vs the causal "
                            f"full forward ({who} requiring grad, {label})")
                    if got[name] is None or gw is None:
                        raise CheckFailure(f"{what}: no gradient ({sz})")
                    assert_close(got[name], gw, what=what, sizes=sz, dtype=s.dtype, tol=decode_tol(s))


def _gradients(s: Subject, m: Attention, qkv: Sequence[Tensor], g: Tensor, km: Tensor | None,
               inputs: tuple[str, ...], params: bool, segments: Sequence[int] | None
               ) -> dict[str, Tensor | None]:
    """Gradients of ``(out * g).sum()`` w.r.t. the named ``inputs`` and (if ``params``) every
    trainable parameter, ``out`` from the causal forward (``segments`` None) or from decoding."""
    leaves = {name: t.detach().clone().requires_grad_(name in inputs)
              for name, t in zip(("query", "key", "value"), qkv, strict=True)}
    trainable = {name: p for name, p in m.named_parameters() if p.requires_grad}
    try:
        for p in trainable.values():
            p.requires_grad_(params)
            p.grad = None
        q, k, v = leaves.values()
        b, h, n, _ = q.shape
        if segments is None:
            out = m(q, k, v, is_causal=True, key_mask=km)  # (B, H, L, Ev)
        else:
            state = m.init_state(b, h, E, EV, dtype=s.dtype, device=s.device, max_length=n)
            out, _ = run_decode(s, m, state, q, k, v, km, segments)  # (B, H, L, Ev)
        (out * g).sum().backward()
    finally:
        for p in trainable.values():
            p.requires_grad_(True)
    grads = {name: leaves[name].grad for name in inputs}
    return grads | ({f"parameter {name}": p.grad for name, p in trainable.items()} if params else {})


@check("lower_right_alignment", "decoding", requires=("decoding",))
def lower_right_alignment(s: Subject) -> None:
    """``is_causal=True, causal_alignment="lower_right"`` with the last T queries (T = 1, 5,
    L/2 + 1 and L, lengths 13 and 131) against all L keys: forward and ``attention_weights``
    equal the last T rows of the causal full forward to 1e-10 in float64, without and with left
    padding via ``key_mask``; the gradients w.r.t. query, key and value are equal too. More
    queries than keys (L queries, L - 4 keys): with ``cross_attention``, the first 4 queries
    come before every key and give output, weights and query gradient exactly 0, the others
    (output, weights, gradients) equal the causal forward of the last L - 4 queries; without
    it, ``ValueError`` naming the query length."""
    for n in (SHORT, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(B, h, n, ev=EV, seed=n + 30)
        sz = sizes_of(q, k, v)
        _more_queries_than_keys(s, m, n, h)
        for label, km in _padding_cases(s, B, n, n // 2):
            full = m(q, k, v, is_causal=True, key_mask=km)  # (B, H, L, Ev)
            w_full = m.attention_weights(q, k, is_causal=True, key_mask=km)  # (B, H, L, L)
            for t in sorted({1, 5, n // 2 + 1, n}):
                kw = {"is_causal": True, "causal_alignment": "lower_right", "key_mask": km}
                what = f"last {t} queries (lower_right) vs the causal full forward ({label})"
                tol = decode_tol(s)
                assert_close(m(q[:, :, n - t:], k, v, **kw), full[:, :, n - t:], what="output of the " + what,
                             sizes=sz, dtype=s.dtype, tol=tol)
                assert_close(m.attention_weights(q[:, :, n - t:], k, **kw), w_full[:, :, n - t:],
                             what="attention_weights of the " + what, sizes=sz, dtype=s.dtype, tol=tol)
                if t < n:
                    _same_gradients(s, m, n, t, h, km, label)


def _more_queries_than_keys(s: Subject, m: Attention, n: int, h: int, d: int = 4) -> None:
    """Lower-right alignment of ``n`` queries against ``n - d`` keys (see lower_right_alignment)."""
    kw: dict[str, object] = {"is_causal": True, "causal_alignment": "lower_right"}
    q, k, v = s.inputs(B, h, n, n - d, ev=EV, seed=n + 35, grad=True)
    sz = sizes_of(q, k, v)
    if not s.caps.cross_attention:
        for what, call in (("forward", lambda: m(q, k, v, **kw)),
                           ("attention_weights", lambda: m.attention_weights(q, k, **kw))):
            expect_raises(ValueError, call, what=f"{what} with causal_alignment='lower_right' and more "
                          f"queries than keys ({sz}) in a variant without cross_attention",
                          names=("query length",))
        return
    tol = decode_tol(s)
    g = s.randn(B, h, n, EV, seed=n + 36)  # (B, H, Lq, Ev) upstream gradient
    for label, km in _padding_cases(s, B, n - d, 3):
        what = (f"the last {n - d} of {n} queries (lower_right, {n - d} keys) vs their causal forward "
                f"({label})")
        out = m(q, k, v, key_mask=km, **kw)  # (B, H, n, Ev)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        ql = q.detach()[:, :, d:].requires_grad_(True)  # (B, H, n - d, E)
        want = m(ql, k, v, is_causal=True, key_mask=km)  # (B, H, n - d, Ev)
        want_grads = torch.autograd.grad((want * g[:, :, d:]).sum(), (ql, k, v))
        first = f"the first {d} queries (before every key; {label})"
        _all_zero(out[:, :, :d], what="output of " + first, sizes=sz)
        assert_close(out[:, :, d:], want, what="output of " + what, sizes=sz, dtype=s.dtype, tol=tol)
        qd, kd = q.detach(), k.detach()  # the weights need no graph
        w = m.attention_weights(qd, kd, key_mask=km, **kw)  # (B, H, n, n - d)
        _all_zero(w[:, :, :d], what="attention_weights of " + first, sizes=sz)
        assert_close(w[:, :, d:], m.attention_weights(qd[:, :, d:], kd, is_causal=True, key_mask=km),
                     what="attention_weights of " + what, sizes=sz, dtype=s.dtype, tol=tol)
        assert_finite(grads[0], what=f"gradient w.r.t. query with more queries than keys ({label})", sizes=sz)
        _all_zero(grads[0][:, :, :d], what="gradient w.r.t. " + first, sizes=sz)
        for name, got, exp in zip(("query", "key", "value"), (grads[0][:, :, d:], *grads[1:]), want_grads,
                                  strict=True):
            assert_close(got, exp, what=f"gradient w.r.t. {name} of " + what, sizes=sz, dtype=s.dtype,
                         tol=tol)


def _all_zero(t: Tensor, *, what: str, sizes: str) -> None:
    assert_zero(t, torch.ones_like(t, dtype=torch.bool), what=what, sizes=sizes)


def _same_gradients(s: Subject, m: Attention, n: int, t: int, h: int, km: Tensor | None, label: str) -> None:
    qf, kf, vf = s.inputs(B, h, n, ev=EV, seed=n + 30, grad=True)
    g = s.randn(B, h, t, EV, seed=n + t)  # (B, H, T, Ev) upstream gradient of the last T outputs
    (m(qf, kf, vf, is_causal=True, key_mask=km)[:, :, n - t:] * g).sum().backward()
    ql = qf.detach()[:, :, n - t:].clone().requires_grad_(True)  # (B, H, T, E)
    kl, vl = (x.detach().clone().requires_grad_(True) for x in (kf, vf))
    (m(ql, kl, vl, is_causal=True, causal_alignment="lower_right", key_mask=km) * g).sum().backward()
    sz = sizes_of(ql, kl, vl)
    for name, got, want in (("query", ql.grad, qf.grad[:, :, n - t:]), ("key", kl.grad, kf.grad),
                            ("value", vl.grad, vf.grad)):
        if got is None:
            raise CheckFailure(f"no gradient w.r.t. {name} through causal_alignment='lower_right' ({sz})")
        assert_close(got, want, what=f"gradient w.r.t. {name} of the last {t} outputs, lower_right vs "
                     f"the causal full forward ({label})", sizes=sz, dtype=s.dtype, tol=decode_tol(s))


@check("state_reorder", "decoding", requires=("decoding",))
def state_reorder(s: Subject) -> None:
    """Beam-search style reordering: after a prefix, ``state.index_select([2, 0, 2])`` (rows
    reordered, one dropped, one repeated) and more decoding equals decoding the reordered batch
    from scratch (1e-10 in float64, with left padding via ``key_mask`` where declared, lengths 13
    and 131); the original state still decodes correctly afterwards (``index_select`` copies);
    ``state.to(its device)`` keeps the type and decodes the same; ``nbytes`` is an int > 0."""
    for n in (SHORT, LONG):
        _reorder_case(s, n, torch.tensor([2, 0, 2], device=s.device))


def _reorder_case(s: Subject, n: int, idx: Tensor) -> None:
    b, h = 3, heads_for(n)
    m = s.build(heads=h)
    q, k, v = s.inputs(b, h, n, ev=EV, seed=n + 40)
    segments = schedules(n)[0]
    head, rest = segments[:2], segments[2:]
    p = sum(head)
    km = left_padding(s, b, n, segments[0]) if s.caps.key_mask else None
    sz = sizes_of(q, k, v) + f", reordered after {p} positions"
    tol = decode_tol(s)

    def scratch(q: Tensor, k: Tensor, v: Tensor, km: Tensor | None) -> Tensor:
        fresh = m.init_state(b, h, E, EV, dtype=s.dtype, device=s.device, max_length=n)
        return run_decode(s, m, fresh, q, k, v, km, segments)[0][:, :, p:]  # (B, H, L - p, Ev)

    state = m.init_state(b, h, E, EV, dtype=s.dtype, device=s.device, max_length=n)
    _, state = run_decode(s, m, state, q, k, v, km, head)
    reordered = state.index_select(idx)
    if type(reordered) is not type(state) or reordered.batch != len(idx):
        raise CheckFailure(f"index_select gave a {type(reordered).__name__} of batch {reordered.batch}, "
                           f"expected a {type(state).__name__} of batch {len(idx)}")
    qr, kr, vr = (x[idx] for x in (q, k, v))
    kmr = None if km is None else km[idx]
    got, _ = run_decode(s, m, reordered, qr, kr, vr, kmr, rest, start=p)
    assert_close(got, scratch(qr, kr, vr, kmr), what=f"decoding after state.index_select({idx.tolist()}) "
                 "vs decoding the reordered batch from scratch", sizes=sz, dtype=s.dtype, tol=tol)
    moved = state.to(s.device)
    if type(moved) is not type(state) or moved.device != s.device:
        raise CheckFailure(f"state.to({s.device}) gave a {type(moved).__name__} on {moved.device}")
    got, last = run_decode(s, m, moved, q, k, v, km, rest, start=p)
    assert_close(got, scratch(q, k, v, km), what="decoding the original state (moved with .to(its "
                 "device)) after decoding a reordered copy vs decoding from scratch", sizes=sz,
                 dtype=s.dtype, tol=tol)
    nbytes = last.nbytes
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise CheckFailure(f"state.nbytes after decoding {n} positions is {nbytes!r}, expected an int > 0")
