"""Checks of the weights oracle, every mask form, fully-masked rows, and information leaks."""

from __future__ import annotations

from typing import Any

import torch

from attnreg.core import causal_mask

from ._asserts import assert_close, assert_equal, assert_finite, assert_matches_weights, assert_zero, sizes_of
from ._checks_nonfinite import GRAD_FILLS, NONFINITE, grads_of, poisons
from ._framework import LONG, B, H, Subject, check, expected_allowed, heads_for
from ._outcomes import CheckFailure, NotApplicable


@check("forward_matches_weights", "weights")
def forward_matches_weights(s: Subject) -> None:
    """``forward == attention_weights @ value`` (the weights are the oracle of every other
    check), lengths 1, 7, 13 and 131, with no mask and every declared mask kind, alone and
    combined."""
    for n in (1, 7, 13, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=n, seed=n)
        for label, kw in s.mask_variants(n, n, h=h, seed=n):
            assert_matches_weights(m, q, k, v, label=label, **kw)


@check("rows_sum_to_one", "weights", requires=("normalized",))
def rows_sum_to_one(s: Subject) -> None:
    """Where ``normalized``: without masks every row of the weights sums to 1; with masks every
    row sums to 1, except rows with nothing to attend (no key that both the masks and the
    variant's own pattern, its unmasked weights' support, allow), which are exactly 0."""
    for n in (1, 7, 13, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, _ = s.inputs(h=h, lq=n, seed=n)
        sz = sizes_of(q, k)
        pattern = m.attention_weights(q, k).double() != 0  # (B, H, Lq, Lk): the variant's own support
        for label, kw in s.mask_variants(n, n, h=h, seed=n):
            w = m.attention_weights(q, k, **kw).double()
            sums = w.sum(-1)  # (B, H, Lq)
            one = torch.ones_like(sums)
            if not kw:
                assert_close(sums, one, what="row sums of the weights (no mask)", sizes=sz, dtype=s.dtype)
                continue
            dead = ~expected_allowed(s, q, k, kw).any(-1)  # (B, H, Lq): the masks leave nothing
            assert_zero(w, dead[..., None], what=f"weights of rows with nothing to attend ({label})",
                        sizes=sz)
            # A row may also be empty because the masks hide every key of the variant's own pattern
            # (a window, a block layout); every other row must sum to 1 (a near-zero sum on a live
            # row is a bug, not a "zero row").
            empty = ~(expected_allowed(s, q, k, kw) & pattern).any(-1)  # (B, H, Lq)
            target = torch.where(empty, torch.zeros_like(sums), one)
            assert_close(sums, target, what=f"row sums of the weights with {label} (1, or 0 exactly where "
                         "the masks leave nothing of the pattern to attend)", sizes=sz, dtype=s.dtype)


def _check_mask(s: Subject, m: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                label: str, kw: dict[str, Any], equivalent: dict[str, Any] | None = None) -> None:
    """Weights exactly 0 where masked, forward == weights @ V, and (if given) the same result as
    the equivalent mask expressed another way."""
    sz = sizes_of(q, k, v)
    w = m.attention_weights(q, k, **kw)
    assert_zero(w, ~expected_allowed(s, q, k, kw), what=f"weights at masked positions ({label})", sizes=sz)
    out = m(q, k, v, **kw)
    assert_close(out, w.double() @ v.double(), what=f"forward vs attention_weights @ value with {label}",
                 sizes=sz, dtype=s.dtype)
    if equivalent is not None:
        assert_close(out, m(q, k, v, **equivalent), dtype=s.dtype, sizes=sz,
                     what=f"forward with {label} vs the same mask given as {sorted(equivalent)}")


@check("mask_bool_broadcast", "masking", requires=("attn_mask",))
def mask_bool_broadcast(s: Subject) -> None:
    """A bool ``attn_mask`` of every broadcastable shape ((Lk,), (Lq, 1), (Lq, Lk), (H, Lq, Lk),
    (B, 1, Lq, Lk), (1, H, Lq, Lk), (B, H, Lq, Lk), (B, 1, 1, Lk), ...) gives weights exactly 0
    where masked, the same output as the mask expanded to (B, H, Lq, Lk), and forward ==
    weights @ V."""
    m = s.build()
    pairs = [(7, 7), (13, 13)] + ([(5, 9)] if s.caps.cross_attention else [])
    for lq, lk in pairs:
        q, k, v = s.inputs(lq=lq, lk=lk, seed=lq)
        shapes = [(lk,), (1, lk), (lq, 1), (lq, lk), (H, lq, lk), (1, lq, lk), (B, 1, lq, lk),
                  (1, H, lq, lk), (B, H, lq, lk), (B, 1, 1, lk), (B, H, 1, lk), (1, 1, lq, 1)]
        for i, shape in enumerate(shapes):
            am = s.bool_mask(*shape, seed=100 + i)
            full = am.reshape((1,) * (4 - am.dim()) + shape).expand(B, H, lq, lk).contiguous()
            _check_mask(s, m, q, k, v, f"bool attn_mask of shape {shape}", {"attn_mask": am},
                        {"attn_mask": full})


@check("mask_key_padding", "masking", requires=("key_mask",))
def mask_key_padding(s: Subject) -> None:
    """``key_mask`` (B, Lk): weights are exactly 0 on padded keys, forward == weights @ V, and
    (where ``attn_mask`` is declared) the result equals ``attn_mask=key_mask[:, None, None, :]``."""
    pairs = [(7, 7), (13, 13), (LONG, LONG)] + ([(5, 9), (9, 5)] if s.caps.cross_attention else [])
    for lq, lk in pairs:
        h = heads_for(max(lq, lk))
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=lq, lk=lk, seed=lk)
        km = s.key_mask(B, lk, seed=lk)
        eq = {"attn_mask": km[:, None, None, :]} if s.caps.attn_mask else None
        _check_mask(s, m, q, k, v, "key_mask", {"key_mask": km}, eq)


@check("mask_causal", "masking", requires=("causal",))
def mask_causal(s: Subject) -> None:
    """``is_causal=True``: weights exactly 0 above the diagonal (upper-left aligned when
    Lq != Lk, like SDPA), forward == weights @ V, and (where ``attn_mask`` is declared) the
    same result as the explicit ``causal_mask(Lq, Lk)`` as a bool ``attn_mask``."""
    pairs = [(1, 1), (7, 7), (13, 13), (LONG, LONG)] + ([(5, 9), (9, 5)] if s.caps.cross_attention else [])
    for lq, lk in pairs:
        h = heads_for(max(lq, lk))
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=lq, lk=lk, seed=lq + lk)
        eq = {"attn_mask": causal_mask(lq, lk, s.device)} if s.caps.attn_mask else None
        _check_mask(s, m, q, k, v, "is_causal", {"is_causal": True}, eq)


@check("mask_combined", "masking")
def mask_combined(s: Subject) -> None:
    """Every pair and the triple of the declared ``key_mask``, ``is_causal`` and bool
    ``attn_mask`` combine as a logical AND: weights exactly 0 where any of them masks, forward ==
    weights @ V, and (where ``attn_mask`` is declared) the same result as one combined bool mask."""
    kinds = [kind for kind in ("key_mask", "causal", "attn_mask") if getattr(s.caps, kind)]
    if len(kinds) < 2:
        raise NotApplicable(f"fewer than two mask kinds declared ({kinds or 'none'})")
    for n in (7, 13, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=n, seed=n)
        parts = {"key_mask": {"key_mask": s.key_mask(B, n, seed=n)}, "causal": {"is_causal": True},
                 "attn_mask": {"attn_mask": s.bool_mask(B, 1, n, n, seed=n + 1, keep=0.8)}}
        pairs = [[a, b] for i, a in enumerate(kinds) for b in kinds[i + 1:]]
        subsets = [kinds] + (pairs if len(kinds) > 2 else [])
        for subset in subsets:
            kw = {key: val for kind in subset for key, val in parts[kind].items()}
            eq = {"attn_mask": expected_allowed(s, q, k, kw)} if s.caps.attn_mask else None
            _check_mask(s, m, q, k, v, " + ".join(subset), kw, eq)


@check("mask_float_additive", "masking", requires=("float_mask",))
def mask_float_additive(s: Subject) -> None:
    """A float ``attn_mask`` is added to the logits: all zeros equals no mask; 0/-inf equals the
    bool mask (False where -inf); a +1 on one key column raises that column's weights (and, where
    ``normalized``, the weights become ``w * exp(mask)`` renormalised per row, as for a softmax
    of logits + mask); forward == weights @ V."""
    m = s.build()
    for n in (7, 13):
        q, k, v = s.inputs(lq=n, seed=n)
        sz = sizes_of(q, k, v)
        zeros = torch.zeros(n, n, dtype=s.dtype, device=s.device)
        assert_close(m(q, k, v, attn_mask=zeros), m(q, k, v), what="forward with an all-zero float mask "
                     "vs no mask", sizes=sz, dtype=s.dtype)
        allowed = s.bool_mask(B, 1, n, n, seed=n)
        ninf = torch.zeros(B, 1, n, n, dtype=s.dtype, device=s.device).masked_fill(~allowed, float("-inf"))
        _check_mask(s, m, q, k, v, "0/-inf float attn_mask", {"attn_mask": ninf}, {"attn_mask": allowed})
        bump = torch.zeros(n, n, dtype=s.dtype, device=s.device)
        bump[:, n // 2] = 1.0
        w0 = m.attention_weights(q, k).double()
        w1 = m.attention_weights(q, k, attn_mask=bump).double()
        assert_close(m(q, k, v, attn_mask=bump), w1 @ v.double(), what="forward vs attention_weights @ "
                     "value with a float mask", sizes=sz, dtype=s.dtype)
        col0, col1 = w0[..., n // 2], w1[..., n // 2]
        # Rows where the key is inside the variant's own pattern and not already the only key.
        live = (col0 > 0) & (col0 < 1 - 1e-6)
        if not bool(live.any()) or not bool((col1 > col0)[live].all()):
            raise CheckFailure(f"adding +1 to the logits of key {n // 2} did not raise its weight in every "
                               f"row that attends to it (max drop {float((col0 - col1).max()):.3g}) ({sz})")
        if s.caps.normalized:
            scaled = w0 * torch.exp(bump.double())
            denom = scaled.sum(-1, keepdim=True)
            assert_close(w1, scaled / torch.where(denom > 0, denom, torch.ones_like(denom)), dtype=s.dtype,
                         sizes=sz, what="weights with float mask vs softmax(logits + mask) = w*exp(mask) "
                         "renormalised")


def _dead_row_cases(s: Subject, n: int) -> list[tuple[str, dict[str, Any]]]:
    cases = []
    if s.caps.key_mask:
        km = s.key_mask(B, n, seed=n, dead_item=1)
        cases.append(("key_mask with batch item 1 all padding", {"key_mask": km}))
        if s.caps.causal:
            km = s.key_mask(B, n, seed=n)
            km[:, :3] = False  # queries 0..2 see only padding under causality
            cases.append(("is_causal + key_mask hiding keys 0..2", {"key_mask": km, "is_causal": True}))
    if s.caps.attn_mask:
        am = s.bool_mask(B, heads_for(n), n, n, seed=n)
        am[:, :, [0, n // 2]] = False  # two fully masked query rows in every item and head
        cases.append(("bool attn_mask with rows 0 and L/2 all False", {"attn_mask": am}))
    if s.caps.float_mask:
        fm = torch.zeros(n, n, dtype=s.dtype, device=s.device)
        fm[1] = float("-inf")
        cases.append(("float attn_mask with row 1 all -inf", {"attn_mask": fm}))
    return cases


@check("fully_masked_rows", "masking")
def fully_masked_rows(s: Subject) -> None:
    """A query row with nothing to attend (all keys padded, an all-False mask row, causal +
    padding, an all -inf float row) gives output exactly 0 and weights exactly 0, never NaN; the
    backward pass gives finite gradients for query, key, value and parameters, and exactly 0
    gradient for the query of that row."""
    cases = _dead_row_cases(s, 13) + _dead_row_cases(s, LONG)
    if not cases:
        raise NotApplicable("no mask that can empty a row is declared (key_mask / attn_mask)")
    for label, kw in cases:
        n = next(t for t in kw.values() if isinstance(t, torch.Tensor)).shape[-1]
        m = s.build(heads=heads_for(n))
        q, k, v = s.inputs(h=heads_for(n), lq=n, seed=n, grad=True)
        sz = sizes_of(q, k, v)
        dead = ~expected_allowed(s, q, k, kw).any(-1)  # (B, H, Lq)
        assert bool(dead.any()), "test setup: no dead row"
        w = m.attention_weights(q, k, **kw)
        assert_finite(w, what=f"weights ({label})", sizes=sz)
        assert_zero(w, dead[..., None], what=f"weights of rows with nothing to attend ({label})", sizes=sz)
        out = m(q, k, v, **kw)
        assert_finite(out, what=f"output ({label})", sizes=sz)
        assert_zero(out, dead[..., None], what=f"output of rows with nothing to attend ({label})", sizes=sz)
        m.zero_grad(set_to_none=True)
        (out * s.randn(*out.shape, seed=5)).sum().backward()
        for name, t in (("query", q), ("key", k), ("value", v), *m.named_parameters()):
            if t.grad is not None:
                assert_finite(t.grad, what=f"gradient of {name} ({label})", sizes=sz)
        assert_zero(q.grad, dead[..., None], what=f"query gradient of rows with nothing to attend ({label})",
                    sizes=sz)


@check("causal_no_future_leak", "leakage", requires=("causal",))
def causal_no_future_leak(s: Subject) -> None:
    """Under ``is_causal``, changing query, key and value tokens after position t (to large
    random values, NaN, +inf or -inf) leaves the outputs at positions <= t bit-for-bit unchanged
    (also with ``key_mask`` and Lq != Lk where declared); the gradients of a loss over the
    outputs <= t equal the clean run's (finite) with NaN or +inf keys and values after t, and are
    exactly 0 for the keys and values after t."""
    pairs = [(13, 13), (LONG, LONG)] + ([(9, 13), (13, 9)] if s.caps.cross_attention else [])
    for lq, lk in pairs:
        h = heads_for(max(lq, lk))
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=lq, lk=lk, seed=lq)
        extra = [{}] + ([{"key_mask": s.key_mask(B, lk, seed=lk)}] if s.caps.key_mask else [])
        for t in sorted({0, min(lq, lk) // 2 - 1, min(lq, lk) - 2}):
            for fill_label, fills in _future_fills(s, h, lq, lk, q.shape[-1], v.shape[-1], t):
                q2, k2, v2 = q.clone(), k.clone(), v.clone()
                q2[:, :, t + 1:], k2[:, :, t + 1:], v2[:, :, t + 1:] = fills
                for kw in extra:
                    label = "is_causal" + (" + key_mask" if kw else "")
                    sz = sizes_of(q, k, v) + f", set to {fill_label} after position t={t}"
                    a = m(q, k, v, is_causal=True, **kw)
                    b = m(q2, k2, v2, is_causal=True, **kw)
                    assert_equal(b[:, :, : t + 1], a[:, :, : t + 1], sizes=sz,
                                 what=f"outputs at positions <= t after changing later tokens ({label})")
        t = min(lq, lk) // 2
        r = s.randn(B, h, t + 1, v.shape[-1], seed=4)

        def loss(mod: torch.nn.Module, q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, t: int = t,
                 r: torch.Tensor = r) -> torch.Tensor:
            return (mod(q_, k_, v_, is_causal=True)[:, :, : t + 1] * r).sum()

        want = grads_of(m, (q, k, v), loss)
        sz = sizes_of(q, k, v)
        for name in ("key", "value"):
            assert_zero(want[name], _after(want[name], t), sizes=sz,
                        what=f"gradient of outputs <= {t} w.r.t. {name}s after {t}")
        for fill_label, fill_k, fill_v in GRAD_FILLS:
            k2, v2 = k.clone(), v.clone()
            k2[:, :, t + 1:], v2[:, :, t + 1:] = fill_k, fill_v
            for name, g in grads_of(m, (q, k2, v2), loss).items():
                assert_close(g, want[name], dtype=s.dtype, sizes=sz + f", keys/values after {t} set to "
                             f"{fill_label}", what=f"gradient of {name} (loss over the outputs <= {t})")


def _future_fills(s: Subject, h: int, lq: int, lk: int, e: int, ev: int, t: int
                  ) -> list[tuple[str, tuple[torch.Tensor | float, ...]]]:
    """(label, (query, key, value) fills after position t): large random values, then NaN and inf."""
    rand = (100 * s.randn(B, h, lq - t - 1, e, seed=t + 50), 100 * s.randn(B, h, lk - t - 1, e, seed=t + 51),
            1e3 * s.randn(B, h, lk - t - 1, ev, seed=t + 52))
    return [("large random values", rand)] + [(label, (fk, fk, fv)) for label, fk, fv in NONFINITE]


def _after(g: torch.Tensor, t: int) -> torch.Tensor:
    pos = torch.arange(g.shape[2], device=g.device)[None, None, :, None]  # (1, 1, L, 1)
    return pos > t


@check("padding_invariance", "leakage", requires=("key_mask",))
def padding_invariance(s: Subject) -> None:
    """Keys and values at padded positions (``key_mask`` False) do not matter: poisoning them with
    +1e9, -1e9, large random garbage, NaN, +inf or -inf leaves every output unchanged (also under
    ``is_causal`` where declared); with NaN or +inf there the gradients of query, keys, values and
    parameters equal the clean run's (finite), and padded keys and values get exactly 0 gradient."""
    for n in (13, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=n, seed=n)
        km = s.key_mask(B, n, seed=n)
        pad = ~km[:, None, :, None]  # (B, 1, Lk, 1)
        for causal in (False, True) if s.caps.causal else (False,):
            base = m(q, k, v, key_mask=km, is_causal=causal)
            for label, fill_k, fill_v in poisons(s, k, v, n):
                k2, v2 = torch.where(pad, fill_k, k), torch.where(pad, fill_v, v)
                sz = (sizes_of(q, k, v) + f", padded keys/values set to {label}"
                      + (", causal" if causal else ""))
                assert_close(m(q, k2, v2, key_mask=km, is_causal=causal), base, dtype=s.dtype, sizes=sz,
                             what="outputs after poisoning padded keys and values")
        r = s.randn(B, h, n, v.shape[-1], seed=3)

        def loss(mod: torch.nn.Module, q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor,
                 km: torch.Tensor = km, r: torch.Tensor = r) -> torch.Tensor:
            return (mod(q_, k_, v_, key_mask=km) * r).sum()

        want = grads_of(m, (q, k, v), loss)
        sz = sizes_of(q, k, v)
        for name in ("key", "value"):
            assert_zero(want[name], pad, what=f"gradient of padded {name}s", sizes=sz)
        for label, fill_k, fill_v in GRAD_FILLS:
            for name, g in grads_of(m, (q, torch.where(pad, fill_k, k), torch.where(pad, fill_v, v)),
                                    loss).items():
                assert_close(g, want[name], dtype=s.dtype, sizes=sz + f", padded keys/values set to {label}",
                             what=f"gradient of {name} with poisoned padding vs clean padding")
