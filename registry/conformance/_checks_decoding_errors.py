"""Checks of the decoding API's errors (``Capabilities.decoding``): malformed ``init_state`` /
``decode`` input, and the manifest's use of the API both ways (declared and refused)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnreg.core import Attention, DecodeState, KVCacheState, UnsupportedFeatureError

from ._asserts import expect_raises, sizes_of
from ._framework import EV, B, E, H, Subject, check

__all__ = ["decode_api_refused", "feature_calls_decoding"]


@dataclasses.dataclass
class _ForeignState(DecodeState):
    """A well-formed state of some other variant: ``decode`` must refuse it by type."""

    key: Tensor | None = None


@check("decode_invalid_inputs", "errors", requires=("decoding",))
def decode_invalid_inputs(s: Subject) -> None:
    """Malformed ``init_state`` / ``decode`` input raises ``ValueError`` naming the problem:
    batch, heads, head_dim or max_length < 1; query/key/value of the wrong rank; B, heads, E or
    Ev not matching the state; T = 0 new positions; a dtype other than the state's; a
    ``key_mask`` of the wrong shape or dtype; exceeding ``max_length``; a state that is not this
    variant's (another ``DecodeState`` subclass, not a state at all, or its own state type
    recording another variant or config fingerprint)."""
    m = s.build()
    new = {"dtype": s.dtype, "device": s.device}
    for arg, bad_kw in (("batch", {"batch": 0}), ("heads", {"heads": 0}), ("head_dim", {"head_dim": -1}),
                        ("max_length", {"max_length": 0})):
        kw = {"batch": B, "heads": H, "head_dim": E, "max_length": 9, **bad_kw}
        expect_raises(ValueError, lambda kw=kw: m.init_state(kw["batch"], kw["heads"], kw["head_dim"], EV,
                                                             max_length=kw["max_length"], **new),
                      what=f"init_state with {arg}={bad_kw[arg]}", names=(arg,))
    q, k, v = s.inputs(B, H, 2, ev=EV, seed=5)
    other = torch.float32 if s.dtype != torch.float32 else torch.float64
    bad: list[tuple[str, tuple[str, ...], dict[str, object]]] = [
        ("query of rank 3", ("query",), {"query": q[0]}),
        ("key of rank 5", ("key",), {"key": k[None]}),
        ("value of rank 3", ("value",), {"value": v[0]}),
        ("query with another batch size", ("query", "B="), {"query": q[:1]}),
        ("key and value with another batch size", ("key",), {"key": k[:1], "value": v[:1]}),
        ("key and value with H + 1 heads", ("key", "heads"),
         {"key": torch.cat([k, k[:, :1]], 1), "value": torch.cat([v, v[:, :1]], 1)}),
        ("query with H + 1 heads", ("query", "heads"), {"query": torch.cat([q, q[:, :1]], 1)}),
        ("query with another E", ("query", "E="), {"query": q[..., :-1]}),
        ("key with another E", ("key",), {"key": k[..., :-1]}),
        ("value with another Ev", ("value",), {"value": v[..., :-1]}),
        ("T = 0 new positions", ("T >= 1", "T=0", "empty", "zero"),
         {"query": q[:, :, :0], "key": k[:, :, :0], "value": v[:, :, :0]}),
        (f"inputs in {other} (state in {s.dtype})", ("dtype", "float"),
         {"query": q.to(other), "key": k.to(other), "value": v.to(other)}),
        ("key_mask of shape (B, T + 1)", ("key_mask",),
         {"key_mask": torch.ones(B, 3, dtype=torch.bool, device=s.device)}),
        ("float key_mask", ("key_mask",), {"key_mask": torch.ones(B, 2, dtype=s.dtype, device=s.device)}),
        ("a state that is not a DecodeState", ("state",), {"state": object()}),
        ("another DecodeState subclass", ("state",),
         {"state": _ForeignState(B, H, E, EV, s.dtype, s.device, max_length=9)}),
        ("its own state type, made by another variant", ("state",),
         {"state": dataclasses.replace(m.init_state(B, H, E, EV, max_length=9, **new), variant="other")}),
        ("its own state type, with another config fingerprint", ("state",),
         {"state": dataclasses.replace(m.init_state(B, H, E, EV, max_length=9, **new),
                                       fingerprint=(("something_else", 1),))}),
    ]
    for label, names, override in bad:
        args = {"query": q, "key": k, "value": v, "key_mask": None, **override}
        args.setdefault("state", m.init_state(B, H, E, EV, max_length=9, **new))
        expect_raises(ValueError, lambda a=args: m.decode(a["query"], a["key"], a["value"], a["state"],
                                                          key_mask=a["key_mask"]),
                      what=f"decode with {label} ({sizes_of(q, k, v)})", names=names)
    state = m.init_state(B, H, E, EV, max_length=3, **new)
    _, state = m.decode(q, k, v, state)
    expect_raises(ValueError, lambda: m.decode(q, k, v, state),
                  what="decode of 2 + 2 positions into a state of max_length=3", names=("max_length",))


def feature_calls_decoding(s: Subject, m: Attention) -> list[tuple[str, object]]:
    """(label, thunk) for the decoding API, used both ways by the manifest checks."""
    b, lq = B, 5
    q, k, v = s.inputs(b, H, lq, ev=EV, seed=6)

    def prefill_and_step() -> Tensor:
        state = m.init_state(b, H, E, EV, dtype=s.dtype, device=s.device, max_length=lq + 1)
        out, state = m.decode(q, k, v, state)
        step, _ = m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
        return torch.cat([out, step], dim=2)  # (B, H, T + 1, Ev)

    return [("init_state + decode (a prefill of 5 and one step)", prefill_and_step)]


def decode_api_refused(s: Subject, m: Attention) -> None:
    """With ``decoding=False`` declared, ``init_state`` and ``decode`` raise UnsupportedFeatureError."""
    expect_raises(UnsupportedFeatureError, lambda: m.init_state(B, H, E, EV, dtype=s.dtype, device=s.device),
                  what="init_state with decoding=False declared")
    q, k, v = s.inputs(B, H, 3, ev=EV, seed=6)
    state = KVCacheState(B, H, E, EV, s.dtype, s.device)
    expect_raises(UnsupportedFeatureError, lambda: m.decode(q, k, v, state),
                  what="decode (with a KVCacheState) with decoding=False declared")
