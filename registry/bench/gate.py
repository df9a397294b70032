"""Correctness gate: a variant is timed only after its output matched the oracle at a small size.

The oracle is the variant's own dense ``attention_weights @ V`` evaluated in float64 on a float64
copy of the module (``attention_weights`` is the interface's universal oracle, DESIGN section 2).
Two comparisons, for every causal flag that will be benchmarked:

- the float64 forward against the float64 oracle (tight: catches wrong fast paths), and
- the forward in the benchmark dtype against the float64 oracle (per-dtype tolerance),

plus, when forward+backward is benchmarked, finite gradients of a backward pass.

Fast paths often start only above some length (a window, a chunk, several blocks), so with
``long_length`` the same forward comparisons run again at that length (the harness passes the
longest benchmarked length, capped at 2048) with B=1 and ``long_heads`` heads (a learnable
variant is rebuilt for that head count) to keep the float64 oracle cheap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .settings import DTYPES, VariantChoice

__all__ = ["GateResult", "run_gate", "TOLERANCES"]

# Max |out - oracle| / max |oracle| allowed per dtype.
TOLERANCES = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


@dataclass
class GateResult:
    """Whether a variant passed, and the measured errors (for the report)."""

    ok: bool
    reason: str | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"ok": self.ok, "reason": self.reason, "errors": self.errors}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item() or 1.0
    return (out.double() - ref).abs().max().item() / scale


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


def _gate_decode(choice: VariantChoice, batch: int, heads: int, head_dim: int, length: int,
                 dtype: str, seed: int, result: GateResult) -> GateResult:
    from .decode import decode_gate_error

    try:
        module = choice.spec.factory(choice.config).eval()
        ref = copy.deepcopy(module).to(torch.float64)
        checks = [("float64", ref, torch.float64)] if torch.float64 in choice.spec.capabilities.dtypes else []
        checks.append((dtype, module.to(DTYPES[dtype]), DTYPES[dtype]))
        for name, m, dt in checks:
            err = decode_gate_error(m, ref, batch, heads, head_dim, length, dt, seed)
            result.errors[f"decode/{name}"] = err
            if not err <= TOLERANCES[name]:
                return GateResult(False, f"{name} decoding differs from the causal full forward: "
                                  f"relative error {err:.3g} > {TOLERANCES[name]:g}", result.errors)
    except Exception as exc:  # noqa: BLE001 - a broken variant is reported, not raised
        return GateResult(False, f"decoding: {type(exc).__name__}: {exc}", result.errors)
    return result


def _gate_at(choice: VariantChoice, config: Any, batch: int, heads: int, head_dim: int, length: int,
             dtype: str, causal_flags: tuple[bool, ...], backward: bool, seed: int, prefix: str
             ) -> GateResult:
    caps = choice.spec.capabilities
    errors: dict[str, float] = {}
    try:
        module = choice.spec.factory(config).eval()
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, heads, length, head_dim)
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))  # (B, H, L, E)
        # The oracle runs in float64 where the variant accepts it, else in the best dtype it has.
        oracle = next(d for d in (torch.float64, torch.float32, DTYPES[dtype]) if d in caps.dtypes)
        ref_module = copy.deepcopy(module).to(oracle)
        m64 = ref_module if oracle == torch.float64 else None
        mdt = module.to(DTYPES[dtype])
        for causal in causal_flags:
            tag = "causal" if causal else "full"
            with torch.no_grad():
                w = ref_module.attention_weights(q.to(oracle), k.to(oracle), is_causal=causal)  # (B, H, L, L)
                ref = w.double() @ v  # (B, H, L, E)
                if m64 is not None:
                    err = _rel_err(m64(q, k, v, is_causal=causal), ref)
                    errors[f"{prefix}float64/{tag}"] = err
                    if not err <= TOLERANCES["float64"]:
                        why = (f"float64 forward differs from attention_weights @ V ({tag}): "
                               f"relative error {err:.3g} > {TOLERANCES['float64']:g}")
                        return GateResult(False, why, errors)
                qd, kd, vd = (t.to(DTYPES[dtype]) for t in (q, k, v))
                err = _rel_err(mdt(qd, kd, vd, is_causal=causal), ref)
            errors[f"{prefix}{dtype}/{tag}"] = err
            tol = TOLERANCES[dtype]
            if not err <= tol:
                return GateResult(False, f"{dtype} forward differs from the float64 oracle ({tag}): "
                                  f"relative error {err:.3g} > {tol:g}", errors)
            if backward:
                qd, kd, vd = (t.to(DTYPES[dtype]).requires_grad_(True) for t in (q, k, v))
                mdt(qd, kd, vd, is_causal=causal).sum().backward()
                grads = [t.grad for t in (qd, kd, vd)] + [p.grad for p in mdt.parameters()]
                if not all(g is None or torch.isfinite(g).all() for g in grads):
                    return GateResult(False, f"non-finite gradients in the backward pass ({tag})", errors)
                mdt.zero_grad(set_to_none=True)
    except Exception as exc:  # noqa: BLE001 - a broken variant is reported, not raised
        return GateResult(False, f"{type(exc).__name__}: {exc}", errors)
    return GateResult(True, None, errors)

