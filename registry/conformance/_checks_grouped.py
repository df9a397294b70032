"""Checks of grouped-query attention (``Capabilities.grouped_query``): key/value with fewer heads
than the query behave exactly like key/value repeated per query head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnreg.core import repeat_kv

from ._asserts import assert_close, sizes_of
from ._checks_decoding import SHORT, decode_tol, left_padding, run_decode, schedules
from ._framework import EV, LONG, B, E, Subject, check
from ._outcomes import CheckFailure

# (length, query heads, key/value heads): grouped (H/2) on short inputs, multi-query (one
# key/value head) on the long one (fewer heads keep it cheap).
_SHAPES = ((SHORT, 4, 2), (LONG, 2, 1))


@check("grouped_query_matches_repeat", "grouped_query", requires=("grouped_query",))
def grouped_query_matches_repeat(s: Subject) -> None:
    """Key/value with Hkv = H/2 heads (H=4, L=13) and Hkv = 1 (H=2, L=131) give the same output
    and ``attention_weights`` as the same call with key/value repeated per query head
    (``repeat_interleave``: key/value head j serves query heads j*G .. j*G+G-1), with no mask and
    every declared mask kind; the gradients w.r.t. query are equal and those w.r.t. the grouped
    key/value equal the sum over their group; where ``decoding`` is declared too, decoding with a
    state of Hkv heads and queries of H heads equals the causal full forward on repeated
    key/value (1e-10 in float64, with and without left padding)."""
    for n, h, hkv in _SHAPES:
        m = s.build(heads=h)
        q = s.randn(B, h, n, E, seed=n)  # (B, H, L, E)
        k = s.randn(B, hkv, n, E, seed=n + 1)  # (B, Hkv, L, E)
        v = s.randn(B, hkv, n, EV, seed=n + 2)  # (B, Hkv, L, Ev)
        s.last_sizes = sz = sizes_of(q, k, v) + f" Hkv={hkv}"
        for label, kw in s.mask_variants(n, n, h=h, seed=n):
            want = m(q, repeat_kv(k, h), repeat_kv(v, h), **kw)
            assert_close(m(q, k, v, **kw), want, what=f"output with {hkv} key/value heads vs repeated to "
                         f"{h} ({label})", sizes=sz, dtype=s.dtype)
            assert_close(m.attention_weights(q, k, **kw), m.attention_weights(q, repeat_kv(k, h), **kw),
                         what=f"attention_weights with {hkv} key heads vs repeated to {h} ({label})",
                         sizes=sz, dtype=s.dtype)
        _same_gradients(s, m, q, k, v, s.padding_and_causal(B, n, seed=n), sz)
        if s.caps.decoding:
            _grouped_decode(s, m, q, k, v, sz)


def _same_gradients(s: Subject, m: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor,
                    kw: dict[str, Any], sz: str) -> None:
    h = q.shape[1]
    g = s.randn(*q.shape[:3], v.shape[-1], seed=7)  # (B, H, L, Ev) upstream gradient
    grads = []
    for grouped in (True, False):
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        kk, vv = (kg, vg) if grouped else (repeat_kv(kg, h), repeat_kv(vg, h))
        (m(qg, kk, vv, **kw) * g).sum().backward()
        grads.append((qg.grad, kg.grad, vg.grad))
    label = sorted(kw) or "no mask"
    for name, got, want in zip(("query", "key", "value"), *grads, strict=True):
        if got is None:
            raise CheckFailure(f"no gradient w.r.t. the {name} with grouped key/value ({sz})")
        what = (f"gradient w.r.t. {name}" if name == "query" else
                f"gradient w.r.t. the grouped {name} vs the sum over its group of the repeated one")
        assert_close(got, want, what=f"{what} ({label})", sizes=sz, dtype=s.dtype)


def _grouped_decode(s: Subject, m: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, sz: str) -> None:
    b, h, n, _ = q.shape
    hkv = k.shape[1]
    segments = schedules(n)[0]
    cases: list[tuple[str, Tensor | None]] = [("no padding", None)]
    if s.caps.key_mask:
        cases.append(("left padding via key_mask", left_padding(s, b, n, segments[0])))
    for label, km in cases:
        want = m(q, repeat_kv(k, h), repeat_kv(v, h), is_causal=True, key_mask=km)  # (B, H, L, Ev)
        state = m.init_state(b, hkv, E, EV, dtype=s.dtype, device=s.device, max_length=n)
        got, _ = run_decode(s, m, state, q, k, v, km, segments)
        assert_close(got, want, what=f"decoding {h} query heads with a state of {hkv} key/value heads "
                     f"in calls of {segments} vs the causal full forward on repeated key/value ({label})",
                     sizes=sz, dtype=s.dtype, tol=decode_tol(s))
