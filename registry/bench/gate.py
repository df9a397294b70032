"""Correctness gate: a variant is timed only after its output matched the oracle at a small size.

The oracle is the conformance suite's: the variant's own dense ``attention_weights @ V``
(``attention_weights`` is the interface's universal oracle), evaluated in float64 on a float64
copy of the module, compared with the suite's ``assert_close`` and ``TOLERANCES``. Two
comparisons, for every causal flag that will be benchmarked, at the same inputs rounded to the
benchmark dtype (and the same parameters):

- the float64 forward against the float64 oracle (tight: catches wrong fast paths; the suite's
  ``forward_matches_weights``), and
- the forward in the benchmark dtype against the float64 oracle (the suite's ``low_precision``),

plus, when forward+backward is benchmarked, finite gradients of a backward pass.

Fast paths often start only above some length (a window, a chunk, several blocks), so with
``long_length`` the same forward comparisons run again at that length (the harness passes the
longest benchmarked length, capped at 2048) with B=1 and ``long_heads`` heads (a learnable
variant is rebuilt for that head count) to keep the float64 oracle cheap. The report keeps, per
comparison, the relative error ``max|out - oracle| / max|oracle|``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnreg.conformance import CheckFailure, assert_close, sizes_of, weights_oracle
from attnreg.core import Attention
from attnreg.core.dtypes import DTYPE_NAMES

from .settings import VariantChoice

__all__ = ["GateResult", "run_gate"]


@dataclass
class GateResult:
    """Whether a variant passed, and the measured errors (for the report)."""

    ok: bool
    reason: str | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"ok": self.ok, "reason": self.reason, "errors": self.errors}


class _Mismatch(Exception):
    """A comparison of the gate failed; the message is the gate's reason."""


def _rel_err(out: Tensor, ref: Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (out.double() - ref).abs().max().item() / scale


def _compare(errors: dict[str, float], key: str, out: Tensor, want: Tensor, dtype: torch.dtype,
             why: str, sizes: str) -> None:
    """Record the relative error of ``out`` under ``key``; raise ``_Mismatch`` (``why``, then the
    conformance suite's finding) unless it is within the suite's tolerance of ``dtype``."""
    errors[key] = _rel_err(out, want)
    try:
        assert_close(out, want, what=f"output (relative error {errors[key]:.3g})", sizes=sizes, dtype=dtype)
    except CheckFailure as failure:
        raise _Mismatch(f"{why}: {failure}") from None


def run_gate(choice: VariantChoice, batch: int, heads: int, head_dim: int, length: int,
             dtype: str, causal_flags: tuple[bool, ...], backward: bool, seed: int = 0, *,
             long_length: int | None = None, long_heads: int = 1, decode: bool = False) -> GateResult:
    """Check ``choice`` at a small size, then (forward only) at ``long_length`` if it is longer;
    never raises for a broken variant (returns ok=False). Errors at the long length are keyed
    ``"L=<n>/<dtype>/<full|causal>"``. With ``decode``, decoding (prefill, single steps, a chunk)
    must also match the causal oracle at the small size (keys ``"decode/<dtype>"``)."""
    result = _gate_at(choice, choice.config, batch, heads, head_dim, length, dtype, causal_flags,
                      backward, seed, "")
    if result.ok and decode:
        result = _gate_decode(choice, batch, heads, head_dim, length, dtype, seed, result)
    if not result.ok or long_length is None or long_length <= length:
        return result
    h = min(heads, long_heads)
    config = choice.config
    if getattr(config, "num_heads", None) is not None:  # learnable: parameters are per head
        config = type(config).model_validate({**config.model_dump(), "num_heads": h})
    long = _gate_at(choice, config, 1, h, head_dim, long_length, dtype, causal_flags, False, seed,
                    f"L={long_length}/")
    result.errors.update(long.errors)
    if not long.ok:
        return GateResult(False, f"at L={long_length} (B=1, H={h}): {long.reason}", result.errors)
    return result


def _inputs(batch: int, heads: int, head_dim: int, length: int, dtype: torch.dtype, seed: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value (B, H, L, E), random in float64, rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # type: ignore[return-value]
                 for _ in range(3))


def _gate_decode(choice: VariantChoice, batch: int, heads: int, head_dim: int, length: int,
                 dtype: str, seed: int, result: GateResult) -> GateResult:
    dt = DTYPE_NAMES[dtype]
    try:
        module = choice.spec.factory(choice.config).eval().to(dt)
        ref = copy.deepcopy(module).to(torch.float64)  # the same parameters, in float64
        checks = [("float64", ref, torch.float64)] if torch.float64 in choice.spec.capabilities.dtypes else []
        checks.append((dtype, module, dt))
        q, k, v = _inputs(batch, heads, head_dim, length, dt, seed)  # (B, H, L, E)
        with torch.no_grad():
            want = ref(q.double(), k.double(), v.double(), is_causal=True)  # (B, H, L, E)
            for name, m, mdt in checks:
                got = _decode_in_steps(m, q.to(mdt), k.to(mdt), v.to(mdt))  # (B, H, L, E)
                _compare(result.errors, f"decode/{name}", got, want, mdt,
                         f"{name} decoding differs from the causal full forward", sizes_of(q, k, v))
    except _Mismatch as mismatch:
        return GateResult(False, str(mismatch), result.errors)
    except Exception as exc:  # noqa: BLE001 - a broken variant is reported, not raised
        return GateResult(False, f"decoding: {type(exc).__name__}: {exc}", result.errors)
    return result


def _decode_in_steps(module: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Decoding of the whole sequence (B, H, L, E): a prefill of about a third, single steps,
    then one chunk."""
    batch, heads, length, head_dim = q.shape
    state = module.init_state(batch, heads, head_dim, dtype=q.dtype, max_length=length)
    cuts = sorted({0, length // 3, length // 3 + 1, length // 3 + 2, length // 2, length})
    outs: list[Tensor] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        out, state = module.decode(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state)
        outs.append(out)
    return torch.cat(outs, dim=2)  # (B, H, L, E)


def _gate_at(choice: VariantChoice, config: Any, batch: int, heads: int, head_dim: int, length: int,
             dtype: str, causal_flags: tuple[bool, ...], backward: bool, seed: int, prefix: str
             ) -> GateResult:
    caps = choice.spec.capabilities
    dt = DTYPE_NAMES[dtype]
    errors: dict[str, float] = {}
    try:
        module = choice.spec.factory(config).eval().to(dt)
        # The oracle runs in float64 where the variant accepts it, else in the best dtype it has.
        oracle = next(d for d in (torch.float64, torch.float32, dt) if d in caps.dtypes)
        ref = copy.deepcopy(module).to(oracle)  # the same parameters, in the oracle's dtype
        q, k, v = _inputs(batch, heads, head_dim, length, dt, seed)  # (B, H, L, E)
        qo, ko, vo = (t.to(oracle) for t in (q, k, v))
        for causal in causal_flags:
            tag = "causal" if causal else "full"
            with torch.no_grad():
                want = weights_oracle(ref, qo, ko, vo, is_causal=causal)  # (B, H, L, E) float64
                if oracle == torch.float64:
                    _compare(errors, f"{prefix}float64/{tag}", ref(qo, ko, vo, is_causal=causal), want,
                             torch.float64, f"float64 forward differs from attention_weights @ V ({tag})",
                             sizes_of(qo, ko, vo))
                _compare(errors, f"{prefix}{dtype}/{tag}", module(q, k, v, is_causal=causal), want, dt,
                         f"{dtype} forward differs from the float64 oracle ({tag})", sizes_of(q, k, v))
            if backward:
                _finite_backward(module, q, k, v, causal, tag)
    except _Mismatch as mismatch:
        return GateResult(False, str(mismatch), errors)
    except Exception as exc:  # noqa: BLE001 - a broken variant is reported, not raised
        return GateResult(False, f"{type(exc).__name__}: {exc}", errors)
    return GateResult(True, None, errors)


def _finite_backward(module: Attention, q: Tensor, k: Tensor, v: Tensor, causal: bool, tag: str) -> None:
    """Raise ``_Mismatch`` unless a backward pass gives finite gradients (inputs and parameters)."""
    qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
    module(qd, kd, vd, is_causal=causal).sum().backward()
    grads = [t.grad for t in (qd, kd, vd)] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    if not all(g is None or torch.isfinite(g).all() for g in grads):
        raise _Mismatch(f"non-finite gradients in the backward pass ({tag})")
