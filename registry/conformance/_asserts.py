"""The comparisons conformance checks make, and their tolerances.

Every comparison raises ``CheckFailure`` (an ``AssertionError``) whose message names what was
compared, the input sizes and the worst entry. The benchmark's correctness gate compares with
the same functions and ``TOLERANCES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnreg.core import Attention
from attnreg.core.dtypes import dtype_name

from ._outcomes import CheckFailure

__all__ = [
    "TOLERANCES", "assert_close", "assert_equal", "assert_finite", "assert_matches_weights", "assert_zero",
    "expect_raises", "sizes_of", "weights_oracle",
]

# (atol, rtol) of a result in a dtype against its oracle: max |out - ref| must stay within
# atol * max(1, max|ref|) + rtol * |ref|. The conformance suite compares at the same (rounded)
# inputs and parameters; the benchmark's correctness gate uses the same table.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def sizes_of(q: Tensor, k: Tensor, v: Tensor | None = None) -> str:
    """``"B=2 H=2 Lq=7 Lk=7 E=8 Ev=6 float64"`` for a failure message."""
    b, h, lq, e = q.shape
    ev = f" Ev={v.shape[-1]}" if v is not None else ""
    return f"B={b} H={h} Lq={lq} Lk={k.shape[2]} E={e}{ev} {dtype_name(q.dtype)}"


def _fmt_index(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]"


def assert_close(actual: Tensor, expected: Tensor, *, what: str, sizes: str, dtype: torch.dtype,
                 tol: tuple[float, float] | None = None) -> None:
    """Fail unless ``|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|``."""
    atol, rtol = tol or TOLERANCES[dtype]
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != b.shape:
        raise CheckFailure(f"{what} ({sizes}): shape {tuple(a.shape)} != expected {tuple(b.shape)}")
    if not torch.isfinite(a).all():
        idx = tuple(int(i) for i in (~torch.isfinite(a)).nonzero()[0])
        raise CheckFailure(f"{what} ({sizes}): non-finite value {float(a[idx])} at index {_fmt_index(idx)}")
    if a.numel() == 0:
        return
    scale = max(1.0, float(b.abs().max()))
    err = (a - b).abs()
    excess = err - (atol * scale + rtol * b.abs())
    if float(excess.max()) > 0:
        flat = int(excess.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise CheckFailure(
            f"{what} ({sizes}): max |error| = {float(err.max()):.3g}, allowed {atol:g} * {scale:.3g} + "
            f"{rtol:g} * |expected| (worst at index {_fmt_index(idx)}: got {float(a[idx]):.6g}, "
            f"expected {float(b[idx]):.6g})"
        )


def assert_equal(actual: Tensor, expected: Tensor, *, what: str, sizes: str) -> None:
    """Fail unless bit-for-bit equal (NaN counts as different)."""
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if a.shape != b.shape:
        raise CheckFailure(f"{what} ({sizes}): shape {tuple(a.shape)} != expected {tuple(b.shape)}")
    diff = a != b
    if bool(diff.any()):
        err = (a.double() - b.double()).abs().nan_to_num(float("inf"))
        idx = tuple(int(i) for i in diff.nonzero()[0])
        raise CheckFailure(
            f"{what} ({sizes}): not bit-for-bit equal, max |difference| = {float(err.max()):.3g} "
            f"in {int(diff.sum())} of {diff.numel()} entries (first at index {_fmt_index(idx)})"
        )


def assert_zero(t: Tensor, where: Tensor, *, what: str, sizes: str) -> None:
    """Fail unless ``t`` is exactly 0 wherever ``where`` is True."""
    vals = t.detach().cpu()[where.expand(t.shape).cpu()]
    bad = vals != 0
    if bool(bad.any()):
        idx = tuple(int(i) for i in (where.expand(t.shape).cpu() & (t.detach().cpu() != 0)).nonzero()[0])
        raise CheckFailure(
            f"{what} ({sizes}): {int(bad.sum())} of {vals.numel()} entries are not exactly 0, "
            f"max |value| = {float(vals.double().abs().nan_to_num(float('inf')).max()):.3g} "
            f"(first at index {_fmt_index(idx)})"
        )


def assert_finite(t: Tensor, *, what: str, sizes: str) -> None:
    """Fail on any NaN or infinity."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckFailure(f"{what} ({sizes}): {int(bad.sum())} non-finite values (first at index "
                           f"{_fmt_index(idx)}: {float(t.detach()[idx])})")


def expect_raises(exc: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[[], Any],
                  *, what: str, names: tuple[str, ...] = ()) -> BaseException:
    """Fail unless ``fn()`` raises ``exc`` whose message mentions one of ``names`` (if given)."""
    expected = exc if isinstance(exc, tuple) else (exc,)
    label = " or ".join(e.__name__ for e in expected)
    try:
        fn()
    except expected as err:
        msg = str(err)
        if names and not any(n in msg for n in names):
            raise CheckFailure(f"{what}: raised {type(err).__name__} as expected, but the message "
                               f"does not name {' / '.join(names)}: {msg!r}") from None
        return err
    except Exception as err:  # noqa: BLE001 - the wrong error type is the finding
        raise CheckFailure(f"{what}: expected {label}, got {type(err).__name__}: {err}") from err
    raise CheckFailure(f"{what}: expected {label}, but the call succeeded silently")


def weights_oracle(module: Attention, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """``attention_weights(q, k) @ v`` in float64: the oracle of every forward comparison."""
    return module.attention_weights(q, k, **kw).double() @ v.double()  # (B, H, Lq, Ev)


def assert_matches_weights(module: Attention, q: Tensor, k: Tensor, v: Tensor, *, label: str,
                           dtype: torch.dtype | None = None, **kw: Any) -> None:
    """Fail unless ``module(q, k, v, **kw) == attention_weights(q, k, **kw) @ v`` within the
    tolerance of ``dtype`` (default: the inputs' dtype); ``label`` names the masks."""
    assert_close(module(q, k, v, **kw), weights_oracle(module, q, k, v, **kw), dtype=dtype or q.dtype,
                 what=f"forward vs attention_weights @ value with {label}", sizes=sizes_of(q, k, v))
