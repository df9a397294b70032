"""Checks that NaN and inf at positions a query cannot see never reach its output.

A key or value a query does not attend (padding, a mask, the causal future, a variant's own
pattern such as a window or a block layout) must not change that query's output or gradients,
whatever it holds: fused kernels that mask by adding ``-inf`` or multiply by a weight of 0 turn a
NaN there into NaN everywhere. And a non-finite input a query does attend must show in its
output (never silently replaced). ``padding_invariance`` and ``causal_no_future_leak``
(``_checks_masking``) poison with the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from attnreg.core import Attention

from ._asserts import assert_close, sizes_of
from ._framework import EV, LONG, B, E, Subject, check, heads_for
from ._outcomes import CheckFailure

__all__ = ["GRAD_FILLS", "NONFINITE", "grads_of", "poisons"]

NAN, INF = float("nan"), float("inf")
# (label, key fill, value fill): every non-finite kind, alone and mixed.
NONFINITE = (("NaN", NAN, NAN), ("+inf", INF, INF), ("-inf", -INF, -INF), ("NaN keys, +inf values", NAN, INF))
GRAD_FILLS = NONFINITE[:2]  # gradients are compared under NaN and under inf (each a backward pass)


def poisons(s: Subject, k: Tensor, v: Tensor, seed: int) -> Iterator[tuple[str, Any, Any]]:
    """(label, key fill, value fill) of every poison: huge finite values, random garbage, NaN, inf."""
    yield "+1e9", 1e9, 1e9
    yield "-1e9", -1e9, -1e9
    yield "random * 1e4", 1e4 * s.randn(*k.shape, seed=seed + 7), 1e4 * s.randn(*v.shape, seed=seed + 8)
    yield from NONFINITE


def grads_of(m: Attention, inputs: tuple[Tensor, ...], loss_of: Any) -> dict[str, Tensor]:
    """Gradients of ``loss_of(m, q, k, v)`` w.r.t. fresh leaf copies of query, key, value and
    the module's parameters, by name."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    m.zero_grad(set_to_none=True)
    loss_of(m, *leaves).backward()
    out = {name: t.grad if t.grad is not None else torch.zeros_like(t)
           for name, t in zip(("query", "key", "value"), leaves, strict=True)}
    for name, p in m.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.clone()
    return out


def _poison_positions(n: int) -> tuple[list[int], list[int]]:
    """Positions whose key is poisoned and positions whose value is (overlapping in one)."""
    return [n // 3, n - 2], [n // 2, n - 2]


@check("nonfinite_locality", "leakage")
def nonfinite_locality(s: Subject) -> None:
    """NaN, +inf or -inf (or NaN keys with +inf values) in the keys at two positions and the
    values at two positions (one of them shared) change only the rows that attend to them,
    with no mask and every declared mask kind (lengths 13 and 131): rows whose weights on those
    positions are all exactly 0 (masked, or outside the variant's own pattern: a window, a
    block layout; a weight 0 by the data alone, e.g. relu features without overlap, does not
    count: the check also takes the weights of positive inputs) keep their outputs, weights and
    gradients (a loss over those rows; query, key, value and parameters; under NaN and +inf)
    equal to the clean run's, finite; every row with a non-zero weight on a NaN key or a
    non-finite value has a non-finite output entry (a NaN is never silently dropped)."""
    for n in (13, LONG):
        h = heads_for(n)
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=n, ev=EV, seed=n + 3)
        k_at, v_at = _poison_positions(n)
        for fill_label, fill_k, fill_v in NONFINITE:
            k2, v2 = k.clone(), v.clone()
            k2[:, :, k_at] = fill_k
            v2[:, :, v_at] = fill_v
            for label, kw in s.mask_variants(n, n, h=h, seed=n):
                sz = (sizes_of(q, k, v) + f", {fill_label} at keys {k_at} and values {v_at}, {label}")
                w = m.attention_weights(q, k, **kw).double()  # (B, H, Lq, Lk)
                # A weight can also be 0 by the data alone (relu features without overlap); such a
                # position is not masked (linear attention sums phi(k) v^T over every key it may
                # see), so a row counts as attending where either these inputs or positive ones
                # (no zero by the data) give it a non-zero weight.
                w_pos = m.attention_weights(q.abs() + 0.1, k.abs() + 0.1, **kw).double()  # (B, H, Lq, Lk)
                hit = ((w != 0) | (w_pos != 0))[..., sorted(set(k_at + v_at))].any(-1)  # (B, H, Lq)
                clean, got = m(q, k, v, **kw), m(q, k2, v2, **kw)
                keep = ~hit[..., None]  # (B, H, Lq, 1)
                assert_close(torch.where(keep, got, 0), torch.where(keep, clean, 0), dtype=s.dtype, sizes=sz,
                             what="outputs of rows that do not attend to the poisoned positions")
                assert_close(torch.where(keep, m.attention_weights(q, k2, **kw), 0),
                             torch.where(keep, w.to(s.dtype), 0), dtype=s.dtype, sizes=sz,
                             what="weights of rows that do not attend to the poisoned positions")
                # A NaN key, or a NaN or inf value, makes a row attending it non-finite in the
                # formula itself (an inf key may not: its logit can be -inf, its weight 0).
                shown = sorted(set(v_at + (k_at if fill_k != fill_k else [])))
                must = (w[..., shown] != 0).any(-1)  # (B, H, Lq)
                finite_rows = torch.isfinite(got).all(-1)  # (B, H, Lq)
                if bool((must & finite_rows).any()):
                    idx = tuple(int(i) for i in (must & finite_rows).nonzero()[0])
                    raise CheckFailure(f"row {list(idx)} attends to a poisoned position (weight != 0) but "
                                       f"its output is finite: the non-finite input was dropped ({sz})")
                if not bool(keep.any()) or (fill_label, fill_k, fill_v) not in GRAD_FILLS:
                    continue
                r = s.randn(*clean.shape, seed=n + 5)

                def loss(mod: Attention, q_: Tensor, k_: Tensor, v_: Tensor, kw: dict = kw,
                         keep: Tensor = keep, r: Tensor = r) -> Tensor:
                    return (torch.where(keep, mod(q_, k_, v_, **kw), 0) * r).sum()

                want = grads_of(m, (q, k, v), loss)
                for name, g in grads_of(m, (q, k2, v2), loss).items():
                    assert_close(g, want[name], dtype=s.dtype, sizes=sz, what=f"gradient of {name} "
                                 "(loss over the rows that do not attend to the poisoned positions)")


@check("decode_padding_nonfinite", "decoding", requires=("decoding", "key_mask"))
def decode_padding_nonfinite(s: Subject) -> None:
    """Decoding with left padding whose padded keys and values hold NaN, +inf or -inf (B=3, 13
    positions: a prefill of 5, single tokens, a chunk of 5) gives the same outputs as with clean
    padding, finite; and within a multi-token chunk (a prefill of 7), NaN and inf in its last 2
    positions leave the outputs of its first 5 unchanged."""
    from ._checks_decoding import left_padding, run_decode

    b, n, segments = 3, 13, (5, 1, 1, 5, 1)
    m = s.build()
    q, k, v = s.inputs(b, lq=n, ev=EV, seed=n + 40)
    km = left_padding(s, b, n, segments[0])
    pad = ~km[:, None, :, None]  # (B, 1, L, 1)

    def decoded(k_: Tensor, v_: Tensor, segs: tuple[int, ...], mask: Tensor | None) -> Tensor:
        state = m.init_state(b, q.shape[1], E, EV, dtype=s.dtype, device=s.device, max_length=n)
        return run_decode(s, m, state, q, k_, v_, mask, segs)[0]  # (B, H, sum(segs), Ev)

    want = decoded(k, v, segments, km)
    for label, fill_k, fill_v in NONFINITE:
        got = decoded(torch.where(pad, fill_k, k), torch.where(pad, fill_v, v), segments, km)
        assert_close(got, want, dtype=s.dtype, sizes=sizes_of(q, k, v) + f", padded keys/values {label}",
                     what="decoded outputs with poisoned padding vs clean padding")
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 5:7], v2[:, :, 5:7] = fill_k, fill_v
        got = decoded(k2, v2, (7,), None)[:, :, :5]
        assert_close(got, decoded(k, v, (7,), None)[:, :, :5], dtype=s.dtype,
                     sizes=sizes_of(q, k, v) + f", {label} at positions 5 and 6 of a prefill of 7",
                     what="decoded outputs of positions 0..4 with later positions of the chunk poisoned")


def _meta(t: Any) -> Any:
    return t.to("meta") if isinstance(t, Tensor) else t


@check("meta_device", "contract")
def meta_device(s: Subject) -> None:
    """On the ``meta`` device (shape inference without memory): ``forward`` with no mask and
    every declared mask kind, ``attention_weights``, and where declared ``init_state`` +
    ``decode`` (a prefill of 5 with a key_mask, one step) return tensors of the right shape and
    dtype on ``meta``; or the variant raises ``UnsupportedFeatureError`` naming ``meta``."""
    from attnreg.core import UnsupportedFeatureError

    n = 13
    m = s.build().to("meta")
    q, k, v = (_meta(t) for t in s.inputs(lq=n, ev=EV, seed=1))
    calls: list[tuple[str, Any, tuple[int, ...]]] = []
    for label, kw in s.mask_variants(n, n, seed=n):
        kw = {key: _meta(val) for key, val in kw.items()}
        calls.append((f"forward with {label}", lambda kw=kw: m(q, k, v, **kw), (B, q.shape[1], n, EV)))
        calls.append((f"attention_weights with {label}", lambda kw=kw: m.attention_weights(q, k, **kw),
                      (B, q.shape[1], n, n)))
    if s.caps.decoding:
        def decode() -> Tensor:
            state = m.init_state(B, q.shape[1], E, EV, dtype=s.dtype, device="meta", max_length=n)
            km = _meta(s.key_mask(B, 5, seed=3)) if s.caps.key_mask else None
            _, state = m.decode(q[:, :, :5], k[:, :, :5], v[:, :, :5], state, key_mask=km)
            return m.decode(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], state)[0]

        calls.append(("init_state + decode", decode, (B, q.shape[1], 1, EV)))
    sz = sizes_of(q, k, v) + " on meta"
    for label, call, shape in calls:
        try:
            out = call()
        except UnsupportedFeatureError as err:
            if "meta" not in str(err):
                raise CheckFailure(f"{label} raised UnsupportedFeatureError without naming 'meta': {err} "
                                   f"({sz})") from None
            continue
        except Exception as err:  # noqa: BLE001 - any other error is the finding
            raise CheckFailure(f"{label} raised {type(err).__name__}: {err} (expected a result or "
                               f"UnsupportedFeatureError naming 'meta') ({sz})") from err
        if not isinstance(out, Tensor) or out.device.type != "meta" or tuple(out.shape) != shape \
                or out.dtype != s.dtype:
            got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, Tensor) else type(out)
            raise CheckFailure(f"{label} returned {got}, expected shape {shape}, {s.dtype} on meta ({sz})")
