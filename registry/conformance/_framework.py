"""The machinery every conformance check uses: the check registry, the sizes, the inputs.

A check is a plain function ``fn(subject) -> None`` that raises ``CheckFailure`` (an
``AssertionError`` whose message names the input sizes and the max error) or ``NotApplicable``
(both in ``_outcomes``); the comparisons that raise ``CheckFailure`` are in ``_asserts``.
It is registered with ``@check(name, group, requires=..., dtypes=...)``; ``requires`` names the
``Capabilities`` flags that must be declared True for it to apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import attnreg
from attnreg.core import Attention, Capabilities, VariantSpec
from attnreg.core.dtypes import FLOAT_DTYPES

# assert_close and sizes_of stood here before _asserts.py; tests still import them from here.
from ._asserts import assert_close, sizes_of

__all__ = [
    "B", "CHECKS", "CONFIG_GROUPS", "E", "EV", "GROUPS", "H", "LONG", "Check", "Subject", "assert_close",
    "check", "config_label", "expected_allowed", "heads_for", "reference_dtype", "sizes_of",
]

# Default input sizes: tiny, so that the whole suite runs in seconds per variant. LONG is prime
# and above every block/chunk size the built-ins use (32, 64, 128), so blocked paths see several
# blocks and a ragged last block.
B, H, E, EV = 2, 2, 8, 6
LONG = 131


def heads_for(n: int) -> int:
    """Heads used at length ``n``: H for short inputs, 1 for long ones (keeps the suite fast)."""
    return H if n <= 16 else 1

# Table columns, in display order.
GROUPS = ("manifest", "contract", "errors", "weights", "masking", "leakage", "independence",
          "gradients", "precision", "decoding", "grouped_query", "context_parallel", "benchmark",
          "determinism", "config")
# Groups also run under each of a spec's ``check_configs`` (the numeric behaviour of the fast
# paths); manifest/errors/config/determinism test the spec and the config schema, which the
# overrides do not change, so they run once, under the default config.
CONFIG_GROUPS = ("contract", "weights", "masking", "leakage", "independence", "gradients", "precision",
                 "decoding", "grouped_query", "context_parallel", "benchmark")


def config_label(variant: str, overrides: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()) -> str:
    """``"local"`` or, under check_configs overrides, ``"local[window=2,block_size=4]"``."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    shown = ",".join(f"{k}={v}" for k, v in items)
    return f"{variant}[{shown}]" if shown else variant


@dataclass(frozen=True)
class Check:
    """One named conformance check."""

    name: str
    group: str
    fn: Callable[[Subject], None]
    doc: str
    requires: tuple[str, ...] = ()
    dtypes: str = "reference"  # "reference": once; "each": every declared dtype; "low": all but ref

    def not_applicable(self, caps: Capabilities) -> str | None:
        """Why this check does not apply to ``caps``, or None when it does."""
        missing = [r for r in self.requires if not getattr(caps, r)]
        if missing:
            return "declares " + ", ".join(f"{m}=False" for m in missing)
        return None

    def dtypes_for(self, caps: Capabilities) -> list[torch.dtype]:
        """The dtypes this check runs at for a variant declaring ``caps``."""
        ref = reference_dtype(caps)
        if self.dtypes == "reference":
            return [ref]
        declared = [d for d in FLOAT_DTYPES if d in caps.dtypes]
        return declared if self.dtypes == "each" else [d for d in declared if d != ref]


CHECKS: dict[str, Check] = {}


def check(name: str, group: str, *, requires: tuple[str, ...] = (), dtypes: str = "reference"
          ) -> Callable[[Callable[[Subject], None]], Callable[[Subject], None]]:
    """Register ``fn`` as the conformance check ``name`` (its docstring is its documentation)."""
    assert group in GROUPS, group
    assert dtypes in ("reference", "each", "low"), dtypes

    def deco(fn: Callable[[Subject], None]) -> Callable[[Subject], None]:
        if name in CHECKS:
            raise ValueError(f"conformance check {name!r} defined twice")
        doc = " ".join((fn.__doc__ or "").split())
        CHECKS[name] = Check(name, group, fn, doc, tuple(requires), dtypes)
        return fn

    return deco


def reference_dtype(caps: Capabilities) -> torch.dtype:
    """float64 when declared (exact checks), else the most precise declared dtype."""
    for d in FLOAT_DTYPES:  # most precise first
        if d in caps.dtypes:
            return d
    raise AssertionError("unreachable: Capabilities.dtypes is never empty")


@dataclass
class Subject:
    """The variant under test at one dtype: builds modules and inputs, compares results."""

    spec: VariantSpec
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    overrides: Mapping[str, Any] = field(default_factory=dict)  # one of the spec's check_configs
    last_sizes: str = ""  # sizes of the latest inputs made, named when the variant crashes

    @property
    def caps(self) -> Capabilities:
        """The declared capabilities."""
        return self.spec.capabilities

    @property
    def ref_dtype(self) -> torch.dtype:
        """The dtype exact checks run at (float64 unless not declared)."""
        return reference_dtype(self.caps)

    def shape_fields(self, heads: int, head_dim: int) -> dict[str, int]:
        """``num_heads``/``head_dim`` overrides for configs that have those fields."""
        fields = self.spec.config.model_fields
        out = {}
        if "num_heads" in fields:
            out["num_heads"] = heads
        if "head_dim" in fields:
            out["head_dim"] = head_dim
        return out

    def build(self, heads: int = H, head_dim: int = E, *, seed: int = 0, dtype: torch.dtype | None = None,
              train: bool = False, **fields: Any) -> Attention:
        """``attnreg.build(name, **overrides, **fields)`` seeded, moved to the dtype/device, in eval mode."""
        torch.manual_seed(seed)
        merged = {**self.shape_fields(heads, head_dim), **self.overrides, **fields}
        module = attnreg.build(self.spec.name, **merged)
        module = module.to(device=self.device, dtype=dtype or self.dtype)
        return module.train(train)

    def randn(self, *shape: int, seed: int, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal tensor from a private generator (the global RNG is left alone)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def inputs(self, b: int = B, h: int = H, lq: int = 7, lk: int | None = None, e: int = E,
               ev: int | None = None, *, seed: int = 0, dtype: torch.dtype | None = None,
               grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Random ``query (B,H,Lq,E)``, ``key (B,H,Lk,E)``, ``value (B,H,Lk,Ev)``."""
        lk = lq if lk is None else lk
        ev = e if ev is None else ev
        q = self.randn(b, h, lq, e, seed=seed, dtype=dtype)  # (B, H, Lq, E)
        k = self.randn(b, h, lk, e, seed=seed + 1, dtype=dtype)  # (B, H, Lk, E)
        v = self.randn(b, h, lk, ev, seed=seed + 2, dtype=dtype)  # (B, H, Lk, Ev)
        self.last_sizes = sizes_of(q, k, v)
        return tuple(t.requires_grad_(grad) for t in (q, k, v))  # type: ignore[return-value]

    def bool_mask(self, *shape: int, seed: int, keep: float = 0.7) -> Tensor:
        """Random bool mask, True (may attend) with probability ``keep``."""
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(*shape, generator=g) < keep).to(self.device)

    def key_mask(self, b: int, lk: int, *, seed: int, dead_item: int | None = None) -> Tensor:
        """Padding mask (B, Lk): item i is right-padded by 2*i tokens and has one random hole;
        ``dead_item`` is entirely padding."""
        km = torch.ones(b, lk, dtype=torch.bool)
        g = torch.Generator().manual_seed(seed)
        for i in range(b):
            km[i, max(1, lk - 2 * i):] = False
            if lk > 3:
                km[i, int(torch.randint(0, lk - 1, (1,), generator=g))] = False
            km[i, 0] = True  # every live item keeps at least one real key
        if dead_item is not None:
            km[dead_item] = False
        return km.to(self.device)

    def padding_and_causal(self, b: int, lk: int, *, seed: int) -> dict[str, Any]:
        """Mask kwargs of a typical call: a ``key_mask`` (B, Lk) and ``is_causal`` where declared."""
        kw: dict[str, Any] = {}
        if self.caps.key_mask:
            kw["key_mask"] = self.key_mask(b, lk, seed=seed)
        if self.caps.causal:
            kw["is_causal"] = True
        return kw

    def mask_variants(self, lq: int, lk: int, b: int = B, h: int = H, *, seed: int = 0
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, mask kwargs) for no mask and every declared mask kind, alone and combined."""
        caps = self.caps
        yield "no mask", {}
        combo: dict[str, Any] = {}
        if caps.key_mask:
            km = self.key_mask(b, lk, seed=seed)
            combo["key_mask"] = km
            yield "key_mask", {"key_mask": km}
        if caps.causal:
            combo["is_causal"] = True
            yield "is_causal", {"is_causal": True}
        if caps.attn_mask:
            am = self.bool_mask(b, h, lq, lk, seed=seed + 7)
            combo["attn_mask"] = am
            yield "bool attn_mask (B,H,Lq,Lk)", {"attn_mask": am}
        if caps.float_mask:
            fm = self.randn(1, h, lq, lk, seed=seed + 9)  # (1, H, Lq, Lk)
            fm = fm.masked_fill(~self.bool_mask(1, h, lq, lk, seed=seed + 11), float("-inf"))
            yield "float attn_mask (1,H,Lq,Lk)", {"attn_mask": fm}
        if len(combo) > 1:
            yield " + ".join(combo), combo


def expected_allowed(subject: Subject, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """Dense (B, H, Lq, Lk) bool of what the masks in ``kwargs`` allow (all True if none)."""
    from attnreg.core import check_inputs

    masks = check_inputs(subject.spec.name, subject.caps, q, k, None, kwargs.get("attn_mask"),
                         kwargs.get("key_mask"), kwargs.get("is_causal", False))
    b, h, lq, _ = q.shape
    allowed = masks.allowed(q.device)
    if allowed is None:
        return torch.ones(b, h, lq, k.shape[2], dtype=torch.bool, device=q.device)
    return allowed.expand(b, h, lq, k.shape[2])


