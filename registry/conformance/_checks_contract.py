"""Checks of the manifest (declared capabilities, both ways), the call contract and input errors."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import attnreg
from attnreg.core import ConfigError, UnknownVariantError, UnsupportedFeatureError
from attnreg.core.dtypes import FLOAT_DTYPES, dtype_name, parse_dtype

from ._asserts import (
    assert_close,
    assert_equal,
    assert_finite,
    assert_matches_weights,
    expect_raises,
    sizes_of,
)
from ._checks_decoding_errors import decode_api_refused, feature_calls_decoding
from ._framework import CHECKS, EV, LONG, B, E, H, Subject, check, config_label, heads_for
from ._outcomes import CheckFailure, NotApplicable


def split_check_key(key: str) -> tuple[str, str | None]:
    """``"low_precision[bfloat16]"`` -> ``("low_precision", "bfloat16")``; ``"gradcheck"`` -> (.., None)."""
    if key.endswith("]") and "[" in key:
        name, dt = key[:-1].split("[", 1)
        return name, dtype_name(parse_dtype(dt))
    return key, None


@check("spec_metadata", "manifest")
def spec_metadata(s: Subject) -> None:
    """The spec and the module agree: the module the factory builds declares the same
    ``Capabilities`` as the spec and the spec's name as ``variant`` (true by construction for a
    spec made with ``VariantSpec.of``; an explicit spec's factory may be any callable);
    ``complexity`` is set; ``approximates`` names
    another registered variant; every ``expected_failures`` key is a real check name (optionally
    ``check[dtype]``, optionally prefixed ``subject:`` naming one of the spec's ``check_configs``)."""
    m = s.build()
    if m.capabilities != s.caps:
        diff = {k: (v, getattr(m.capabilities, k)) for k, v in vars(s.caps).items()
                if getattr(m.capabilities, k) != v}
        raise CheckFailure(f"spec.capabilities and {type(m).__name__}.capabilities differ "
                           f"(field: (spec, module)): {diff}")
    if m.variant != s.spec.name:
        raise CheckFailure(f"{type(m).__name__}.variant = {m.variant!r}, spec name is {s.spec.name!r}")
    if not isinstance(s.caps.complexity, str) or not s.caps.complexity.strip():
        raise CheckFailure(f"Capabilities.complexity must be a non-empty string, got {s.caps.complexity!r}")
    if s.caps.approximates is not None:
        try:
            target = attnreg.get_variant(s.caps.approximates).name
        except UnknownVariantError:
            raise CheckFailure(f"approximates={s.caps.approximates!r} is not a registered variant") from None
        if target == s.spec.name:
            raise CheckFailure("a variant cannot approximate itself")
    labels = {config_label(s.spec.name, c) for c in s.spec.check_configs}
    for full_key in s.spec.expected_failures:
        subject, _, key = full_key.rpartition(":")  # "local[window=2]:check" = under that check_config
        if subject and subject not in labels:
            raise CheckFailure(f"expected_failures key {full_key!r} names {subject!r}, which is not one of "
                               f"the spec's check_configs subjects {sorted(labels)}")
        try:
            name, _ = split_check_key(key)
        except ValueError as err:
            raise CheckFailure(f"expected_failures key {key!r}: {err}") from None
        if name not in CHECKS:
            raise CheckFailure(f"expected_failures names unknown check {name!r}; known: {', '.join(CHECKS)}")


@check("learnable_parameters", "manifest")
def learnable_parameters(s: Subject) -> None:
    """``learnable`` verified both ways. True: the config has ``num_heads`` and ``head_dim``,
    the module has trainable parameters, each gets a non-zero gradient, and the seed changes the
    initialisation. False: the module has no trainable parameters (buffers are allowed)."""
    m = s.build()
    params = dict(m.named_parameters())
    if not s.caps.learnable:
        trainable = sorted(n for n, p in params.items() if p.requires_grad)
        if trainable:
            raise CheckFailure(f"declares learnable=False but has trainable parameters {trainable}")
        return
    missing = [f for f in ("num_heads", "head_dim") if f not in s.spec.config.model_fields]
    if missing:
        raise CheckFailure(f"learnable variant's config {s.spec.config.__name__} lacks {missing}")
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    if not trainable:
        raise CheckFailure("declares learnable=True but has no trainable parameters")
    q, k, v = s.inputs(lq=7, seed=3)
    out = m(q, k, v)
    (out * s.randn(*out.shape, seed=4)).sum().backward()
    dead = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.ne(0).any())]
    if dead:
        raise CheckFailure(f"parameters {dead} got no gradient ({sizes_of(q, k, v)})")
    other = s.build(seed=1)
    if all(torch.equal(p, other.get_parameter(n)) for n, p in trainable.items()):
        raise CheckFailure("building with torch.manual_seed(0) and (1) gave identical parameters")


def _feature_calls(s: Subject) -> list[tuple[str, str, tuple[torch.Tensor, ...], dict[str, Any]]]:
    """(capability flag, label, (query, key, value), forward kwargs) for every call-level feature:
    the mask kinds (Lq = Lk = 7), lower-right causal alignment with Lq=5 < Lk=7 (``decoding``) and
    key/value with H/2 heads (``grouped_query``)."""
    lq = 7
    qkv = s.inputs(lq=lq)
    km = torch.ones(B, lq, dtype=torch.bool, device=s.device)
    am = torch.ones(lq, lq, dtype=torch.bool, device=s.device)
    fm = torch.zeros(lq, lq, dtype=s.dtype, device=s.device)
    q5 = s.randn(B, H, 5, E, seed=8)  # (B, H, 5, E): the last 5 positions of the 7 keys
    k1, v1 = qkv[1][:, : H // 2], qkv[2][:, : H // 2]  # (B, H/2, Lk, E): grouped key/value
    return [("causal", "is_causal=True", qkv, {"is_causal": True}),
            ("key_mask", "key_mask", qkv, {"key_mask": km}),
            ("attn_mask", "a bool attn_mask", qkv, {"attn_mask": am}),
            ("float_mask", "a float attn_mask", qkv, {"attn_mask": fm}),
            ("decoding", "is_causal=True, causal_alignment='lower_right' with Lq=5 < Lk=7",
             (q5, qkv[1], qkv[2]), {"is_causal": True, "causal_alignment": "lower_right"}),
            ("grouped_query", f"key/value with {H // 2} head(s) for {H} query heads (grouped-query)",
             (qkv[0], k1, v1), {})]


@check("unsupported_features_raise", "manifest")
def unsupported_features_raise(s: Subject) -> None:
    """Every capability declared False raises ``UnsupportedFeatureError`` when used, from both
    ``forward`` and ``attention_weights``: ``is_causal=True``, ``key_mask``, bool and float
    ``attn_mask``, Lq != Lk, lower-right causal alignment with Lq < Lk and ``init_state`` /
    ``decode`` (``decoding``), key/value with fewer heads than the query (``grouped_query``),
    every dtype not in ``dtypes``; ``dropout > 0`` at build time (a ``ConfigError`` from a config
    bound is accepted too). A declared-False feature that silently works is a false manifest."""
    m = s.build()
    q, k, v = s.inputs(lq=7)
    tried = 0
    for flag, label, (fq, fk, fv), kw in _feature_calls(s):
        if getattr(s.caps, flag):
            continue
        tried += 1
        what = f"{label} with {flag}=False declared ({sizes_of(fq, fk, fv)})"
        expect_raises(UnsupportedFeatureError, lambda fq=fq, fk=fk, fv=fv, kw=kw: m(fq, fk, fv, **kw),
                      what="forward: " + what)
        expect_raises(UnsupportedFeatureError, lambda fq=fq, fk=fk, kw=kw: m.attention_weights(fq, fk, **kw),
                      what="attention_weights: " + what)
    if not s.caps.decoding:
        decode_api_refused(s, m)
    if not s.caps.cross_attention:
        tried += 1
        for lq, lk in ((5, 7), (7, 5)):
            q2, k2, v2 = s.inputs(lq=lq, lk=lk)
            what = f"Lq != Lk with cross_attention=False declared ({sizes_of(q2, k2, v2)})"
            expect_raises(UnsupportedFeatureError, lambda q2=q2, k2=k2, v2=v2: m(q2, k2, v2),
                          what="forward: " + what)
            expect_raises(UnsupportedFeatureError, lambda q2=q2, k2=k2: m.attention_weights(q2, k2),
                          what="attention_weights: " + what)
    if not s.caps.dropout:
        tried += 1
        expect_raises((UnsupportedFeatureError, ConfigError), lambda: s.build(dropout=0.1),
                      what="build(dropout=0.1) with dropout=False declared")
    for d in FLOAT_DTYPES:
        if d in s.caps.dtypes:
            continue
        tried += 1
        qd, kd, vd = (t.to(d) for t in (q, k, v))
        what = f"inputs in {dtype_name(d)}, not in the declared dtypes"
        expect_raises(UnsupportedFeatureError, lambda qd=qd, kd=kd, vd=vd: m(qd, kd, vd),
                      what="forward: " + what)
    if not tried:
        raise NotApplicable("every feature is declared True and every dtype supported")


@check("declared_features_work", "manifest")
def declared_features_work(s: Subject) -> None:
    """Every capability declared True works when used, in ``forward`` and
    ``attention_weights``: ``is_causal``, ``key_mask``, bool and float ``attn_mask``, Lq != Lk
    both ways, lower-right causal alignment with Lq < Lk and ``init_state`` + ``decode``
    (``decoding``), key/value with H/2 heads (``grouped_query``), ``dropout`` in train mode, every
    declared dtype; each call returns a finite output of the right shape and dtype."""
    m = s.build()
    q, k, v = s.inputs(lq=7)
    for flag, label, (fq, fk, fv), kw in _feature_calls(s):
        if not getattr(s.caps, flag):
            continue
        sz = sizes_of(fq, fk, fv)
        calls = (("forward", partial(m, fq, fk, fv, **kw), fv.shape[-1]),
                 ("attention_weights", partial(m.attention_weights, fq, fk, **kw), fk.shape[2]))
        for fn_name, call, last in calls:
            out = _works(call, f"{fn_name} with {label}", sz)
            if tuple(out.shape) != (B, H, fq.shape[2], last):
                raise CheckFailure(f"{fn_name} with {label}: shape {tuple(out.shape)}, expected "
                                   f"{(B, H, fq.shape[2], last)} ({sz})")
    if s.caps.decoding:
        for label, call in feature_calls_decoding(s, m):
            out = _works(call, label, f"B={B} H={H} E={E} Ev={EV} {dtype_name(s.dtype)}")
            if tuple(out.shape) != (B, H, 6, EV):
                raise CheckFailure(f"{label}: outputs of shape {tuple(out.shape)}, expected {(B, H, 6, EV)}")
    if s.caps.cross_attention:
        for lq, lk in ((5, 7), (7, 5)):
            q2, k2, v2 = s.inputs(lq=lq, lk=lk)
            _call_ok(m, q2, k2, v2, "Lq != Lk (cross_attention=True)")
    if s.caps.dropout:
        _call_ok(s.build(dropout=0.2, train=True), q, k, v, "dropout=0.2 in train mode")
    for d in s.caps.dtypes:
        qd, kd, vd = (t.to(d) for t in (q, k, v))
        out = _call_ok(s.build(dtype=d), qd, kd, vd, f"dtype {dtype_name(d)}")
        if out.dtype != d:
            raise CheckFailure(f"output dtype {out.dtype} for {dtype_name(d)} inputs")


def _works(call: Callable[[], torch.Tensor], label: str, sz: str) -> torch.Tensor:
    """``call()``'s finite result; a declared feature that raises or gives non-finite values fails."""
    try:
        out = call()
    except Exception as err:  # noqa: BLE001 - a declared feature failing is the finding
        raise CheckFailure(f"{label} is declared supported but failed ({sz}): "
                           f"{type(err).__name__}: {err}") from err
    assert_finite(out, what=label, sizes=sz)
    return out


def _call_ok(m: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             label: str) -> torch.Tensor:
    try:
        out = m(q, k, v)
    except Exception as err:  # noqa: BLE001 - a declared feature failing is the finding
        raise CheckFailure(f"{label} is declared supported but failed ({sizes_of(q, k, v)}): "
                           f"{type(err).__name__}: {err}") from err
    assert_finite(out, what=f"forward with {label}", sizes=sizes_of(q, k, v))
    return out


def _self_and_cross(s: Subject, lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    pairs = [(n, n) for n in lengths]
    return pairs + ([(1, 7), (5, 13), (13, 5)] if s.caps.cross_attention else [])


@check("shape_dtype_device", "contract", dtypes="each")
def shape_dtype_device(s: Subject) -> None:
    """For every declared dtype, lengths 1, 7 and 13 (and Lq != Lk where declared): the output
    is (B, H, Lq, Ev) with Ev != E, has the input dtype and device and is finite;
    ``attention_weights`` is (B, H, Lq, Lk) with the input dtype; inputs are not modified."""
    m = s.build()
    for lq, lk in _self_and_cross(s, (1, 7, 13)):
        q, k, v = s.inputs(lq=lq, lk=lk, ev=EV)
        before = [t.clone() for t in (q, k, v)]
        sz = sizes_of(q, k, v)
        out = m(q, k, v)
        w = m.attention_weights(q, k)
        for name, t, shape in (("output", out, (B, H, lq, EV)), ("attention_weights", w, (B, H, lq, lk))):
            if tuple(t.shape) != shape:
                raise CheckFailure(f"{name} shape {tuple(t.shape)}, expected {shape} ({sz})")
            if t.dtype != s.dtype:
                raise CheckFailure(f"{name} dtype {t.dtype}, expected the input dtype {s.dtype} ({sz})")
            if t.device != q.device:
                raise CheckFailure(f"{name} on {t.device}, inputs on {q.device} ({sz})")
            assert_finite(t, what=name, sizes=sz)
        for name, t, t0 in zip(("query", "key", "value"), (q, k, v), before, strict=True):
            assert_equal(t, t0, what=f"{name} after the call (modified in place?)", sizes=sz)


@check("non_contiguous_inputs", "contract")
def non_contiguous_inputs(s: Subject) -> None:
    """Transposed, strided and broadcast (stride-0) views of query, key, value and the masks give
    the same result as contiguous copies."""
    lq = 13
    m = s.build()
    q = s.randn(B, lq, H, E, seed=1).transpose(1, 2)  # (B, H, L, E), a (B, L, H, E) layout
    k = s.randn(1, H, lq, E, seed=2).expand(B, H, lq, E)  # stride 0 over the batch
    v = s.randn(B, H, lq, 2 * E, seed=3)[..., ::2]  # (B, H, L, E), every other column
    s.last_sizes = sizes_of(q, k, v) + " (non-contiguous views)"
    kw: dict[str, Any] = {}
    if s.caps.key_mask:
        kw["key_mask"] = s.key_mask(B, 2 * lq, seed=4)[:, ::2]  # (B, L), strided
    if s.caps.attn_mask:
        kw["attn_mask"] = s.bool_mask(lq, lq, seed=5).t()[None, None].expand(B, H, lq, lq)
    sz = sizes_of(q, k, v)
    for causal in (False, True) if s.caps.causal else (False,):  # the two often take different paths
        kw["is_causal"] = causal
        dense_kw = {n: (t.contiguous() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        want = m(q.contiguous(), k.contiguous(), v.contiguous(), **dense_kw)
        assert_close(m(q, k, v, **kw), want, what=f"forward on non-contiguous views with {sorted(kw)}",
                     sizes=sz, dtype=s.dtype)
        assert_close(m.attention_weights(q, k, **kw),
                     m.attention_weights(q.contiguous(), k.contiguous(), **dense_kw),
                     what=f"attention_weights on non-contiguous views (is_causal={causal})",
                     sizes=sz, dtype=s.dtype)


@check("lengths", "contract")
def lengths(s: Subject) -> None:
    """Lengths 1, 2, 3, 61, 131 and 263 (odd, prime, not divisible by any block or chunk size,
    several blocks long) with no mask, ``is_causal`` and ``key_mask`` where declared: the output
    is finite and equals ``attention_weights @ value``."""
    for n in (1, 2, 3, 61, LONG, 263):
        b, h = (B, H) if n <= 16 else (1, 1)
        m = s.build(heads=h)
        q, k, v = s.inputs(b, h, n, seed=n)
        kws: list[dict[str, Any]] = [{}]
        if s.caps.causal:
            kws.append({"is_causal": True})
        if s.caps.key_mask:
            kws.append({"key_mask": s.key_mask(b, n, seed=n)})
        for kw in kws:
            assert_matches_weights(m, q, k, v, label=f"{sorted(kw) or 'no mask'}", **kw)


@check("cross_attention", "contract", requires=("cross_attention",))
def cross_attention(s: Subject) -> None:
    """Lq != Lk (1x7, 5x13, 13x5, 131x7) with every declared mask kind: the output equals
    ``attention_weights @ value``; under ``is_causal`` the pattern is upper-left aligned (query i
    never sees key j > i)."""
    for lq, lk in ((1, 7), (5, 13), (13, 5), (LONG, 7)):
        h = heads_for(max(lq, lk))
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=lq, lk=lk, seed=lq * 100 + lk)
        sz = sizes_of(q, k, v)
        for label, kw in s.mask_variants(lq, lk, h=h, seed=lq):
            w = m.attention_weights(q, k, **kw)
            assert_close(m(q, k, v, **kw), w.double() @ v.double(),
                         what=f"forward vs attention_weights @ value with {label}", sizes=sz, dtype=s.dtype)
            if kw.get("is_causal"):
                future = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1)  # (Lq, Lk)
                leaked = w.detach()[..., future]
                if bool(leaked.ne(0).any()):
                    raise CheckFailure(f"is_causal with Lq != Lk: weights on keys j > i are non-zero "
                                       f"(max {float(leaked.abs().max()):.3g}); expected upper-left "
                                       f"alignment like SDPA ({sz})")


@check("invalid_inputs_raise", "errors")
def invalid_inputs_raise(s: Subject) -> None:
    """Malformed input raises ``ValueError`` naming the argument: wrong rank, mismatched B, H,
    E or Lk, mixed dtypes, integer tensors, a non-bool ``is_causal``, ``value=None``, masks of the
    wrong shape or dtype (where declared), and for learnable variants H or E different from the
    configured ``num_heads`` / ``head_dim``."""
    m = s.build()
    q, k, v = s.inputs(lq=7)
    bad: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
        ("query of rank 3", ("query",), {"query": q[0]}),
        ("key of rank 5", ("key",), {"key": k[None]}),
        ("value of rank 2", ("value",), {"value": v[0, 0]}),
        ("key with another batch size", ("key",), {"key": k[:1]}),
        # H + 1 heads: not a divisor of H, so not grouped-query attention either.
        ("key with another head count", ("key",), {"key": torch.cat([k, k[:, :1]], dim=1)}),
        ("key with another E", ("key",), {"key": k[..., :-1]}),
        ("value with another Lk", ("value",), {"value": v[:, :, :-1]}),
        ("value with another batch size", ("value",), {"value": v[:1]}),
        ("key of another dtype", ("key", "dtype"),
         {"key": k.to(torch.float32 if s.dtype != torch.float32 else torch.float64)}),
        ("integer query", ("query",), {"query": q.long()}),
        ("is_causal='yes'", ("is_causal",), {"is_causal": "yes"}),
        ("value=None", ("value",), {"value": None}),
    ]
    if s.caps.key_mask:
        bad += [("key_mask of shape (B, Lk+1)", ("key_mask",),
                 {"key_mask": torch.ones(B, 8, dtype=torch.bool, device=s.device)}),
                ("float key_mask", ("key_mask",), {"key_mask": torch.ones(B, 7, device=s.device)})]
    if s.caps.attn_mask:
        bad += [("attn_mask of shape (Lq+1, Lk)", ("attn_mask",),
                 {"attn_mask": torch.ones(8, 7, dtype=torch.bool, device=s.device)}),
                ("integer attn_mask", ("attn_mask",),
                 {"attn_mask": torch.ones(7, 7, dtype=torch.int64, device=s.device)})]
    for label, names, override in bad:
        args = {"query": q, "key": k, "value": v, **override}
        kw = {n: args.pop(n) for n in ("is_causal", "key_mask", "attn_mask") if n in args}
        expect_raises(ValueError, lambda a=args, kw=kw: m(a["query"], a["key"], a["value"], **kw),
                      what=f"forward with {label} ({sizes_of(q, k, v)})", names=names)
    if s.caps.learnable:
        for label, (h, e) in (("H != num_heads", (H + 1, E)), ("E != head_dim", (H, E + 2))):
            q2, k2, v2 = s.inputs(h=h, e=e, lq=7)
            expect_raises(ValueError, lambda q2=q2, k2=k2, v2=v2: m(q2, k2, v2),
                          what=f"forward with {label} (module built for H={H}, E={E}; "
                          f"{sizes_of(q2, k2, v2)})")
