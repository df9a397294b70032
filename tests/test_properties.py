"""Property-based tests of every registered variant's forward pass (hypothesis).

Parametrized over ``attnreg.list_variants()``, so a third-party variant is probed for free, with
only the features its ``Capabilities`` declare. Each example draws a config (one of the spec's
``check_configs`` or the defaults, with random valid values in random fields: the strategies of
``test_config_properties``), a dtype (float64, float32, bfloat16 where declared), shapes (L = 1,
odd lengths, Lq != Lk with ``cross_attention``, lower-right causal with ``decoding``, fewer key
heads with ``grouped_query``), mask forms (padding, bool and float ``attn_mask`` of every
broadcast shape, ``is_causal``, alone and combined) and input magnitudes. The properties:

- building either gives a module or raises ``ConfigError`` / ``UnsupportedFeatureError``;
- ``forward`` with finite inputs gives a finite output of the input dtype equal to
  ``attention_weights(...) @ value`` within the conformance suite's tolerance for that dtype
  (``TOLERANCES``), and in float64 finite gradients;
- one invalid config value is a ``ConfigError``; an undeclared feature is an
  ``UnsupportedFeatureError``; a malformed input is a ``ValueError``. Nothing else is raised.

Deterministic (``derandomize=True``, no example database) so that CI is reproducible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from config_fields import config_fields, minimal_config
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from test_config_properties import invalid, valid
from torch import Tensor

import attnreg
from attnreg import ConfigError, UnsupportedFeatureError
from attnreg.conformance._framework import Subject, assert_close, sizes_of
from attnreg.core import Capabilities, repeat_kv

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = attnreg.list_variants()
# ATTNREG_PROPERTY_SCALE=N runs N times the examples (a deeper local probe; still deterministic).
_SCALE = int(os.environ.get("ATTNREG_PROPERTY_SCALE", "1"))
PROFILE = settings(max_examples=60 * _SCALE, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
# Lengths: 1, odd primes (never a multiple of the small blocks/chunks/windows of check_configs),
# anything up to a few blocks.
LENGTHS = st.one_of(st.just(1), st.sampled_from([3, 5, 7, 11, 13, 17, 19]), st.integers(1, 24))


@dataclass(frozen=True)
class Call:
    """One forward call's shapes, dtype and mask forms (the tensors come from ``seed``)."""

    dtype: torch.dtype
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    e: int
    ev: int
    magnitude: float  # inputs are standard normal times this (0: all zeros)
    is_causal: bool
    alignment: str
    key_mask: str | None  # "random", "right", "left", "dead_item"; None = no key_mask
    attn_mask: tuple[str, tuple[int, ...]] | None  # ("bool" | "float" | "float_min", shape)
    keep: float  # probability that an attn_mask entry allows attention
    seed: int


@st.composite
def calls(draw: st.DrawFn, caps: Capabilities) -> Call:
    """A valid call using only what ``caps`` declares."""
    dtype = draw(st.sampled_from([d for d in DTYPES if d in caps.dtypes]))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    hkv = draw(st.sampled_from([d for d in range(1, h + 1) if h % d == 0])) if caps.grouped_query else h
    is_causal = caps.causal and draw(st.booleans())
    lower_right = caps.decoding and is_causal and draw(st.booleans())
    lq = draw(LENGTHS)
    if caps.cross_attention:
        lk = draw(LENGTHS)
    elif lower_right:
        lk = draw(st.integers(lq, lq + 8))  # queries are the last Lq positions of the keys
    else:
        lk = lq
    pads = [None, "random", "right", "left", "dead_item"]
    key_mask = draw(st.sampled_from(pads)) if caps.key_mask else None
    attn_mask = None
    if caps.attn_mask and draw(st.booleans()):
        kinds = ["bool", "float", "float_min"] if caps.float_mask else ["bool"]
        shape = draw(st.sampled_from([(b, h, lq, lk), (lq, lk), (1, h, 1, lk), (b, 1, lq, 1), (lk,)]))
        attn_mask = (draw(st.sampled_from(kinds)), shape)
    return Call(
        dtype=dtype, b=b, h=h, hkv=hkv, lq=lq, lk=lk, e=draw(st.integers(1, 6)), ev=draw(st.integers(1, 5)),
        magnitude=draw(st.sampled_from([1.0, 0.0, 1e-3, 3.0])), is_causal=is_causal,
        alignment="lower_right" if lower_right else "upper_left", key_mask=key_mask, attn_mask=attn_mask,
        keep=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def shape_fields(variant: str, heads: int, head_dim: int) -> dict[str, int]:
    """``num_heads`` / ``head_dim`` for configs that have them (as the conformance suite sets them)."""
    return Subject(attnreg.get_variant(variant), torch.float64).shape_fields(heads, head_dim)


@st.composite
def configs(draw: st.DrawFn, variant: str, heads: int, head_dim: int) -> tuple[dict[str, Any], list[str]]:
    """A config dict (defaults or one of ``check_configs``, random valid values in random fields)
    and the names of the fields given random values."""
    spec = attnreg.get_variant(variant)
    shapes = shape_fields(variant, heads, head_dim)
    base = draw(st.sampled_from([{}, *map(dict, spec.check_configs)]))
    chosen = {}
    for f in config_fields(variant):
        strat = valid(f)
        if f.name in shapes or strat is None or draw(st.integers(0, 3)) != 0:
            continue  # about one field in four changed: mostly ordinary configs
        chosen[f.name] = draw(strat, label=f.name)
    return {**minimal_config(variant), **base, **chosen, **shapes}, list(chosen)


def _bool_mask(shape: tuple[int, ...], keep: float, g: torch.Generator) -> Tensor:
    return torch.rand(*shape, generator=g) < keep


def make_inputs(c: Call) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """query (B, H, Lq, E), key (B, Hkv, Lk, E), value (B, Hkv, Lk, Ev) and the mask kwargs."""
    g = torch.Generator().manual_seed(c.seed)

    def randn(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * c.magnitude).to(c.dtype)

    q = randn(c.b, c.h, c.lq, c.e)  # (B, H, Lq, E)
    k = randn(c.b, c.hkv, c.lk, c.e)  # (B, Hkv, Lk, E)
    v = randn(c.b, c.hkv, c.lk, c.ev)  # (B, Hkv, Lk, Ev)
    kw: dict[str, Any] = {}
    if c.is_causal:
        kw["is_causal"] = True
        if c.alignment != "upper_left":
            kw["causal_alignment"] = c.alignment
    if c.key_mask is not None:
        km = torch.ones(c.b, c.lk, dtype=torch.bool)  # (B, Lk)
        pads = torch.randint(0, c.lk + 1, (c.b,), generator=g)
        for i in range(c.b):
            n = int(pads[i])
            if c.key_mask == "right" and n:
                km[i, c.lk - n:] = False
            elif c.key_mask == "left":
                km[i, :n] = False
        if c.key_mask == "random":
            km = _bool_mask((c.b, c.lk), 0.6, g)
        elif c.key_mask == "dead_item":
            km[int(torch.randint(0, c.b, (1,), generator=g))] = False
        kw["key_mask"] = km
    if c.attn_mask is not None:
        kind, shape = c.attn_mask
        allow = _bool_mask(shape, c.keep, g)
        if kind == "bool":
            kw["attn_mask"] = allow
        else:  # additive: finite biases, -inf (or, as transformers does, the dtype's min) where masked
            hidden = float("-inf") if kind == "float" else torch.finfo(c.dtype).min
            bias = torch.randn(*shape, generator=g, dtype=torch.float64).to(c.dtype)
            kw["attn_mask"] = bias.masked_fill(~allow, hidden)
    return q, k, v, kw


def _build(cfg: dict[str, Any]) -> attnreg.Attention | None:
    """The module, or None after a documented config error."""
    try:
        return attnreg.build(cfg)
    except (ConfigError, UnsupportedFeatureError) as err:
        msg = str(err)
        assert msg and "pydantic" not in msg, msg
        event(f"build refused: {type(err).__name__}")
        return None


def _calibrated(randomised: list[str], c: Call) -> bool:
    """Whether the tolerance table holds the call: always in float64; below it, for the configs
    and inputs it is calibrated on (the conformance ``low_precision`` check: the defaults or a
    ``check_configs`` entry, inputs of at most unit scale). Random values are ill-conditioned
    there: a huge ``scale`` makes the softmax depend on logit bits the dtype rounds away, 65536
    FAVOR+ features sum 65536 float32 roundings. Outputs must be finite regardless."""
    return c.dtype == torch.float64 or (not randomised and c.magnitude <= 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
@PROFILE
@given(data=st.data())
def test_forward_is_weights_times_value(variant: str, data: st.DataObject) -> None:
    """Valid configs and calls: a finite output equal to ``attention_weights @ value``."""
    caps = attnreg.get_variant(variant).capabilities
    c = data.draw(calls(caps), label="call")
    cfg, randomised = data.draw(configs(variant, c.h, c.e), label="config")
    module = _build(cfg)
    if module is None:
        return
    module = module.to(c.dtype).eval()
    q, k, v, kw = make_inputs(c)
    note(f"masks: { {n: tuple(t.shape) if isinstance(t, Tensor) else t for n, t in kw.items()} }")
    sz = sizes_of(q, k, v)
    grads = c.dtype == torch.float64 and data.draw(st.booleans(), label="backward")
    for t in (q, k, v):
        t.requires_grad_(grads)
    out = module(q, k, v, **kw)  # (B, H, Lq, Ev)
    assert out.shape == (c.b, c.h, c.lq, c.ev) and out.dtype == c.dtype, (out.shape, out.dtype)
    assert bool(torch.isfinite(out).all()), f"non-finite output on finite inputs ({sz})"
    w = module.attention_weights(q, k, **kw)  # (B, H, Lq, Lk)
    assert w.shape == (c.b, c.h, c.lq, c.lk) and bool(torch.isfinite(w).all()), (w.shape, sz)
    if _calibrated(randomised, c):
        vv = repeat_kv(v.detach().double(), c.h)  # (B, H, Lk, Ev)
        assert_close(out, w.detach().double() @ vv, what="forward vs attention_weights @ value",
                     sizes=sz, dtype=c.dtype)
        event("compared")
    if grads:
        params = [p for p in module.parameters() if p.requires_grad]
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(c.seed), dtype=out.dtype)
        got = torch.autograd.grad((out * upstream).sum(), [q, k, v, *params], allow_unused=True)
        for name, gr in zip(("query", "key", "value", *("param",) * len(params)), got, strict=True):
            assert gr is None or bool(torch.isfinite(gr).all()), f"non-finite gradient of {name} ({sz})"


@pytest.mark.parametrize("variant", VARIANTS)
@settings(PROFILE, max_examples=25 * _SCALE)
@given(data=st.data())
def test_an_invalid_value_in_a_random_config_is_a_config_error(variant: str, data: st.DataObject) -> None:
    """Starting from a random valid config (not only the defaults), one invalid value in one field
    is a ``ConfigError`` naming that field."""
    cfg, _ = data.draw(configs(variant, 2, 4), label="config")
    fields = config_fields(variant)
    f = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(invalid(f), label="value")
    with pytest.raises(ConfigError) as info:
        attnreg.build({**cfg, f.name: value})
    assert f"'{f.name}'" in str(info.value), str(info.value)


def _undeclared(caps: Capabilities) -> list[str]:
    """Features ``caps`` declares False that a call can ask for."""
    out = [name for name in ("causal", "key_mask", "attn_mask", "cross_attention", "grouped_query")
           if not getattr(caps, name)]
    if caps.attn_mask and not caps.float_mask:
        out.append("float_mask")
    if caps.causal and not caps.decoding:
        out.append("lower_right")
    return out


MALFORMED = ("rank", "batch", "head_dim", "value_length", "mixed_dtype", "int_tensor", "is_causal",
             "alignment_without_causal", "key_mask_shape", "key_mask_dtype", "attn_mask_shape",
             "attn_mask_dtype", "float_mask_dtype", "more_queries_than_keys")


def _spoil(defect: str, c: Call, q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any]
           ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """The call with one defect: an undeclared feature or a malformed argument."""
    kw = dict(kw)
    if defect == "causal":
        kw["is_causal"] = True
    elif defect == "key_mask":
        kw["key_mask"] = torch.ones(c.b, c.lk, dtype=torch.bool)
    elif defect in ("attn_mask", "attn_mask_shape"):
        kw["attn_mask"] = torch.ones(c.lq + 1, c.lk, dtype=torch.bool) if "shape" in defect else \
            torch.ones(c.lq, c.lk, dtype=torch.bool)
    elif defect == "float_mask":
        kw["attn_mask"] = torch.zeros(c.lq, c.lk, dtype=c.dtype)
    elif defect == "cross_attention":
        k, v = k[:, :, :-1], v[:, :, :-1]  # Lk = Lq - 1 >= 1, not causal
        kw = {}
    elif defect == "grouped_query":
        q = torch.cat([q, q], dim=1)  # (B, 2H, Lq, E) against H key heads
    elif defect == "lower_right":
        k, v = torch.cat([k, k], dim=2), torch.cat([v, v], dim=2)  # Lk = 2 Lq
        kw = {"is_causal": True, "causal_alignment": "lower_right"}
    elif defect == "rank":
        q = q[0]
    elif defect == "batch":
        k = torch.cat([k, k])
    elif defect == "head_dim":
        k = torch.cat([k, k], dim=-1)
    elif defect == "value_length":
        v = torch.cat([v, v], dim=2)
    elif defect == "mixed_dtype":
        v = v.to(torch.float32 if c.dtype == torch.float64 else torch.float64)
    elif defect == "int_tensor":
        q = q.to(torch.int64)
    elif defect == "is_causal":
        kw["is_causal"] = 1
    elif defect == "alignment_without_causal":
        kw["is_causal"], kw["causal_alignment"] = False, "lower_right"
    elif defect == "key_mask_shape":
        kw["key_mask"] = torch.ones(c.b, c.lk + 1, dtype=torch.bool)
    elif defect == "key_mask_dtype":
        kw["key_mask"] = torch.ones(c.b, c.lk, dtype=torch.float64)
    elif defect == "attn_mask_dtype":
        kw["attn_mask"] = torch.ones(c.lq, c.lk, dtype=torch.int64)
    elif defect == "float_mask_dtype":
        kw["attn_mask"] = torch.zeros(c.lq, c.lk, dtype=torch.float32 if c.dtype == torch.float64
                                      else torch.float64)
    elif defect == "more_queries_than_keys":
        k, v = k[:, :, :-1], v[:, :, :-1]
        kw = {"is_causal": True, "causal_alignment": "lower_right"}
    return q, k, v, kw


def _malformed(caps: Capabilities) -> list[str]:
    """Malformed-argument defects that are a ``ValueError`` for a variant declaring ``caps`` (a mask
    kind only where declared: otherwise the undeclared feature is the error)."""
    out = [d for d in MALFORMED if not d.startswith(("key_mask", "attn_mask", "float_mask"))]
    out += ["key_mask_shape", "key_mask_dtype"] if caps.key_mask else []
    out += ["attn_mask_shape", "attn_mask_dtype"] if caps.attn_mask else []
    out += ["float_mask_dtype"] if caps.float_mask else []
    if not (caps.decoding and not caps.cross_attention):
        out.remove("more_queries_than_keys")  # only lower-right without cross attention refuses it
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@settings(PROFILE, max_examples=30 * _SCALE)
@given(data=st.data())
def test_an_undeclared_feature_or_a_malformed_input_is_a_documented_error(
    variant: str, data: st.DataObject
) -> None:
    """One defect in an otherwise valid call: ``UnsupportedFeatureError`` for a feature the
    variant declares False, ``ValueError`` naming the problem for a malformed argument, from
    ``forward`` and ``attention_weights`` alike."""
    caps = attnreg.get_variant(variant).capabilities
    c = data.draw(calls(caps), label="call")
    n = max(c.lq, 2)
    c = replace(c, lq=n, lk=n, hkv=c.h, is_causal=False, alignment="upper_left", attn_mask=None,
                key_mask=None)  # a plain self-attention call, Lq = Lk >= 2
    module = _build(data.draw(configs(variant, c.h, c.e), label="config")[0])
    if module is None:
        return
    module = module.to(c.dtype).eval()
    undeclared, malformed = _undeclared(caps), _malformed(caps)
    defect = data.draw(st.sampled_from(undeclared + malformed), label="defect")
    q, k, v, kw = _spoil(defect, c, *make_inputs(c))
    expected = UnsupportedFeatureError if defect in undeclared else ValueError
    with pytest.raises(expected) as info:
        module(q, k, v, **kw)
    assert str(info.value)
    if defect not in ("value_length", "mixed_dtype"):  # attention_weights takes no value
        with pytest.raises(expected):
            module.attention_weights(q, k, **kw)
