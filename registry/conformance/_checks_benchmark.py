"""Checks of the optional benchmark hooks (``attnreg.core.bench_hooks.BenchmarkHooks``), where
provided: what the bench times and reports from them must be true of the variant."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._asserts import assert_close, expect_raises, sizes_of
from ._framework import EV, LONG, B, E, H, Subject, check, heads_for
from ._outcomes import CheckFailure, NotApplicable

_LENGTHS = (1, 7, 13, LONG)


def _provided(s: Subject, hook: str) -> None:
    if hook not in s.build().benchmark_hooks():
        raise NotApplicable(f"provides no {hook}")


def _accepts(fn: Callable[..., Any], documented: str, *args: Any, **kwargs: Any) -> None:
    """Fail unless ``fn`` can be called with these arguments (the hook's documented signature)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without an inspectable signature: just call it
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        raise CheckFailure(f"must accept the documented signature {documented}: {fn!r}{sig}: {err}") from None


def _causal_flags(s: Subject) -> tuple[bool, ...]:
    return (False, True) if s.caps.causal else (False,)


@check("benchmark_pattern_mask", "benchmark")
def benchmark_pattern_mask(s: Subject) -> None:
    """Where ``pattern_mask`` is provided: for L = 1, 7, 13, 131 and each declared causal flag,
    ``pattern_mask(L, is_causal=, num_heads=H)`` is a bool (H or 1, L, L) tensor equal to the
    support of ``attention_weights`` on random unmasked inputs (True exactly where a weight is
    non-zero), so that the bench's masked-SDPA baselines compute what the variant computes."""
    _provided(s, "pattern_mask")
    for length in _LENGTHS:
        h = heads_for(length)
        m = s.build(heads=h)
        _accepts(m.pattern_mask, "pattern_mask(length, *, is_causal, num_heads)", length, is_causal=False,
                 num_heads=h)
        q, k, _ = s.inputs(h=h, lq=length, seed=length)
        for causal in _causal_flags(s):
            call = f"pattern_mask({length}, is_causal={causal}, num_heads={h})"
            pattern = m.pattern_mask(length, is_causal=causal, num_heads=h)
            if not isinstance(pattern, torch.Tensor) or pattern.dtype != torch.bool:
                raise CheckFailure(f"{call} must return a bool tensor, got "
                                   f"{getattr(pattern, 'dtype', type(pattern).__name__)}")
            if pattern.dim() != 3 or pattern.shape[0] not in (1, h) or pattern.shape[1:] != (length, length):
                raise CheckFailure(f"{call} must have shape (H|1, L, L) = ({h}|1, {length}, {length}), "
                                   f"got {tuple(pattern.shape)}")
            with torch.no_grad():
                support = m.attention_weights(q, k, is_causal=causal) != 0  # (B, H, L, L)
            want = pattern.to(support.device).expand_as(support)  # (B, H, L, L)
            wrong = support != want
            if bool(wrong.any()):
                b, hh, i, j = (int(x) for x in wrong.nonzero()[0])
                side = ("a non-zero weight outside the pattern" if bool(support[b, hh, i, j])
                        else "a weight of exactly 0 inside the pattern")
                raise CheckFailure(
                    f"{call} differs from the support of attention_weights in {int(wrong.sum())} of "
                    f"{wrong.numel()} entries ({sizes_of(q, k)}, is_causal={causal}); first at "
                    f"[{b}, {hh}, {i}, {j}]: {side}"
                )


@check("benchmark_flops", "benchmark")
def benchmark_flops(s: Subject) -> None:
    """Where ``flops`` is provided: ``flops(B, H, L, L, E, Ev, is_causal=)`` is a finite number
    > 0 for L = 1, 7, 13, 131 and each declared causal flag, exactly doubles with the batch and
    does not decrease as L grows; a lower-right call with Lq < Lk (``decoding``) is counted too,
    and the upper-left Lq != Lk a variant without ``cross_attention`` refuses raises
    ``ValueError``."""
    _provided(s, "flops")
    m = s.build()
    _accepts(m.flops, "flops(batch, heads, q_len, k_len, head_dim, value_dim, *, is_causal, "
             "causal_alignment)", B, H, 7, 7, E, EV, is_causal=False, causal_alignment="upper_left")
    for causal in _causal_flags(s):
        previous = 0.0
        for length in _LENGTHS:
            args = (B, H, length, length, E, EV)
            call = f"flops{args} with is_causal={causal}"
            got = m.flops(*args, is_causal=causal)
            if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) \
                    or got <= 0:
                raise CheckFailure(f"{call} must be a finite number > 0, got {got!r}")
            double = m.flops(2 * B, *args[1:], is_causal=causal)
            if not math.isclose(double, 2 * got, rel_tol=1e-12):
                raise CheckFailure(f"{call} = {got!r}, but with batch {2 * B}: {double!r} (not twice as "
                                   "much)")
            if got < previous:
                raise CheckFailure(f"{call} = {got!r} is less than at a shorter length ({previous!r})")
            previous = got
    if s.caps.decoding:
        got = m.flops(B, H, 5, 7, E, EV, is_causal=True, causal_alignment="lower_right")
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) or got <= 0:
            raise CheckFailure(f"flops(Lq=5, Lk=7, lower-right causal) must be a finite number > 0, "
                               f"got {got!r}")
    if not s.caps.cross_attention:
        expect_raises(ValueError, lambda: m.flops(B, H, 5, 7, E, EV, is_causal=False),
                      what="flops with q_len 5 != k_len 7 (upper-left) for a variant without "
                           "cross_attention")


@check("benchmark_baselines", "benchmark")
def benchmark_baselines(s: Subject) -> None:
    """Where ``benchmark_baselines`` is provided: it returns a non-empty mapping of names to
    callables, and each, called as ``fn(query, key, value, is_causal)`` on self-attention inputs
    (L = 7 and 131, each declared causal flag), returns what ``forward`` returns (the reference
    dtype's tolerance): the bench times it as the same computation done the slow way."""
    _provided(s, "benchmark_baselines")
    for length in (7, LONG):
        h = heads_for(length)
        m = s.build(heads=h)
        baselines = m.benchmark_baselines()
        if not isinstance(baselines, Mapping) or not baselines:
            raise CheckFailure(f"benchmark_baselines() must return a non-empty mapping, got {baselines!r}")
        q, k, v = s.inputs(h=h, lq=length, ev=EV, seed=length)
        for name, fn in baselines.items():
            if not isinstance(name, str) or not name or not callable(fn):
                raise CheckFailure(f"benchmark_baselines() entry {name!r}: {fn!r} must be a non-empty "
                                   "name and a callable")
            _accepts(fn, f"baseline {name!r}: fn(query, key, value, is_causal)", q, k, v, False)
            for causal in _causal_flags(s):
                with torch.no_grad():
                    want = m(q, k, v, is_causal=causal)  # (B, H, L, Ev)
                    got = fn(q, k, v, causal)
                if not isinstance(got, torch.Tensor):
                    raise CheckFailure(f"baseline {name!r} returned {type(got).__name__}, not a tensor")
                assert_close(got, want, what=f"baseline {name!r} vs forward (is_causal={causal})",
                             sizes=sizes_of(q, k, v), dtype=s.ref_dtype)
