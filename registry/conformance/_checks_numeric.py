"""Checks of independence, gradients, low precision, determinism, dropout, config and state."""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
from torch.func import functional_call

import attnreg
from attnreg.core import ConfigError, UnsupportedFeatureError
from attnreg.core.dtypes import dtype_name

from ._asserts import assert_close, assert_equal, assert_finite, expect_raises, sizes_of
from ._framework import LONG, B, E, H, Subject, check, heads_for
from ._outcomes import CheckFailure, NotApplicable


@check("batch_independence", "independence")
def batch_independence(s: Subject) -> None:
    """One batch item's output does not depend on another's: changing item 1's inputs leaves
    items 0 and 2 bit-for-bit unchanged, and each item computed alone (B=1) matches the batched
    result; with and without the declared masks."""
    b = 3
    for n in (7, LONG):
        m = s.build(heads=heads_for(n))
        q, k, v = s.inputs(b, heads_for(n), n, seed=n)
        for kw in ({}, s.padding_and_causal(b, n, seed=n)):
            label = sorted(kw) or "no mask"
            full = m(q, k, v, **kw)
            q2, k2, v2 = (t.clone() for t in (q, k, v))
            for t2 in (q2, k2, v2):
                t2[1] = 50 * s.randn(*t2[1].shape, seed=n + 9)
            other = m(q2, k2, v2, **kw)
            sz = sizes_of(q, k, v)
            for i in (0, 2):
                assert_equal(other[i], full[i], what=f"item {i} after changing item 1 ({label})", sizes=sz)
                one = {key: (t[i:i + 1] if key == "key_mask" else t) for key, t in kw.items()}
                alone = m(q[i:i + 1], k[i:i + 1], v[i:i + 1], **one)
                assert_close(alone[0], full[i], what=f"item {i} computed alone vs in the batch ({label})",
                             sizes=sz, dtype=s.dtype)


@check("head_independence", "independence")
def head_independence(s: Subject) -> None:
    """One head's output does not depend on another head's inputs: changing head 1's query, key
    and value leaves heads 0 and 2 bit-for-bit unchanged, with and without the declared masks."""
    h = 3
    m = s.build(heads=h)
    for n in (7, LONG):
        q, k, v = s.inputs(B, h, n, seed=n)
        for kw in ({}, s.padding_and_causal(B, n, seed=n)):
            full = m(q, k, v, **kw)
            q2, k2, v2 = (t.clone() for t in (q, k, v))
            for t2 in (q2, k2, v2):
                t2[:, 1] = 50 * s.randn(*t2[:, 1].shape, seed=n + 9)
            other = m(q2, k2, v2, **kw)
            for i in (0, 2):
                assert_equal(other[:, i], full[:, i], what=f"head {i} after changing head 1 "
                             f"({sorted(kw) or 'no mask'})", sizes=sizes_of(q, k, v))


@check("permutation_invariance", "independence", requires=("permutation_invariant",))
def permutation_invariance(s: Subject) -> None:
    """Where ``permutation_invariant``: permuting keys and values together (and the key axis
    of ``key_mask`` / ``attn_mask``) leaves the output unchanged, and permutes the columns of the
    weights the same way."""
    pairs = [(7, 7), (LONG, LONG)] + ([(5, 13)] if s.caps.cross_attention else [])
    for lq, lk in pairs:
        h = heads_for(max(lq, lk))
        m = s.build(heads=h)
        q, k, v = s.inputs(h=h, lq=lq, lk=lk, seed=lk)
        perm = torch.randperm(lk, generator=torch.Generator().manual_seed(lk)).to(s.device)
        cases: list[dict[str, Any]] = [{}]
        if s.caps.key_mask:
            cases.append({"key_mask": s.key_mask(B, lk, seed=lk)})
        if s.caps.attn_mask:
            cases.append({"attn_mask": s.bool_mask(B, h, lq, lk, seed=lk)})
        if s.caps.float_mask:
            cases.append({"attn_mask": s.randn(lq, lk, seed=lk)})
        for kw in cases:
            pkw = {key: t[..., perm] for key, t in kw.items()}
            sz = sizes_of(q, k, v)
            label = sorted(kw) or "no mask"
            assert_close(m(q, k[:, :, perm], v[:, :, perm], **pkw), m(q, k, v, **kw), dtype=s.dtype,
                         what=f"output with keys and values permuted ({label})", sizes=sz)
            assert_close(m.attention_weights(q, k[:, :, perm], **pkw),
                         m.attention_weights(q, k, **kw)[..., perm],
                         what=f"weights with keys permuted vs permuted weights ({label})", sizes=sz,
                         dtype=s.dtype)


@check("gradcheck", "gradients")
def gradcheck(s: Subject) -> None:
    """``torch.autograd.gradcheck`` in float64 on tiny sizes (B=1, H=1, Lq=Lk=4, E=3, Ev=2) for
    query, key and value, with no mask and with the declared masks; for learnable variants also
    for the parameters (fast mode)."""
    if s.ref_dtype != torch.float64:
        raise NotApplicable("float64 is not a declared dtype")
    m = s.build(heads=1, head_dim=3)
    q, k, v = s.inputs(1, 1, 4, e=3, ev=2, seed=11, grad=True)
    for kw in ({}, s.padding_and_causal(1, 4, seed=4)):
        if "key_mask" in kw:
            kw["key_mask"] = torch.tensor([[True, False, True, True]], device=s.device)
        sz = sizes_of(q, k, v) + (f" with {sorted(kw)}" if kw else "")
        try:
            torch.autograd.gradcheck(lambda q, k, v, kw=kw: m(q, k, v, **kw), (q, k, v), eps=1e-6, atol=1e-5)
        except Exception as err:  # noqa: BLE001 - gradcheck raises GradcheckError / RuntimeError
            raise CheckFailure(f"gradcheck of query, key, value failed ({sz}): {err}") from None
        params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
        if params:
            names = list(params)

            def by_params(*ps: torch.Tensor, kw: dict[str, Any] = kw,
                          names: list[str] = names) -> torch.Tensor:
                inputs = (q.detach(), k.detach(), v.detach())
                return functional_call(m, dict(zip(names, ps, strict=True)), inputs, kw)

            try:
                torch.autograd.gradcheck(by_params, tuple(params.values()), eps=1e-6, atol=1e-5,
                                         fast_mode=True)
            except Exception as err:  # noqa: BLE001
                raise CheckFailure(f"gradcheck of parameters {names} failed ({sz}): {err}") from None


@check("low_precision", "precision", dtypes="low")
def low_precision(s: Subject) -> None:
    """For every declared dtype below float64: output and weights stay within the dtype's
    tolerance of float64 computed from the same (rounded) inputs and parameters, with the
    declared masks including a fully masked row; the output has the input dtype and is finite."""
    ref_dt = s.ref_dtype
    for n in (7, LONG):
        base = s.build(heads=heads_for(n))
        ref = copy.deepcopy(base).to(ref_dt)  # the low-precision parameters, exactly, in float64
        q, k, v = s.inputs(h=heads_for(n), lq=n, seed=n)  # rounded to the low dtype
        kws: list[dict[str, Any]] = [{}, s.padding_and_causal(B, n, seed=n)]
        if s.caps.key_mask:
            kws.append({"key_mask": s.key_mask(B, n, seed=n, dead_item=1)})
        for kw in kws:
            sz = sizes_of(q, k, v) + f" with {sorted(kw) or 'no mask'}"
            out = base(q, k, v, **kw)
            if out.dtype != s.dtype:
                raise CheckFailure(f"output dtype {out.dtype}, expected {s.dtype} ({sz})")
            assert_finite(out, what="output", sizes=sz)
            qr, kr, vr = (t.to(ref_dt) for t in (q, k, v))
            want = ref(qr, kr, vr, **kw)
            assert_close(out, want, what=f"{dtype_name(s.dtype)} output vs {dtype_name(ref_dt)}", sizes=sz,
                         dtype=s.dtype)
            assert_close(base.attention_weights(q, k, **kw), ref.attention_weights(qr, kr, **kw), sizes=sz,
                         what=f"{dtype_name(s.dtype)} weights vs {dtype_name(ref_dt)}", dtype=s.dtype)


@check("determinism", "determinism")
def determinism(s: Subject) -> None:
    """In eval mode two calls give bit-identical outputs; two builds under the same seed give
    identical state and outputs; with dropout 0, train mode equals eval mode."""
    m = s.build()
    q, k, v = s.inputs(lq=13, seed=2)
    kw = s.padding_and_causal(B, 13, seed=2)
    a = m(q, k, v, **kw)
    assert_equal(m(q, k, v, **kw), a, what="second call in eval mode", sizes=sizes_of(q, k, v))
    m2 = s.build()
    _same_state(m2, m, "two builds with torch.manual_seed(0)")
    sz = sizes_of(q, k, v)
    assert_equal(m2(q, k, v, **kw), a, what="output of a second build with the same seed", sizes=sz)
    assert_close(m.train()(q, k, v, **kw), a, what="train mode (dropout 0) vs eval mode", sizes=sz,
                 dtype=s.dtype)


def _same_state(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sorted(sa) != sorted(sb):
        raise CheckFailure(f"{what}: state_dict keys differ: {sorted(sa)} vs {sorted(sb)}")
    for key in sa:
        if not torch.equal(sa[key], sb[key]):
            raise CheckFailure(f"{what}: state_dict entry {key!r} differs")


@check("dropout", "determinism", requires=("dropout",))
def dropout(s: Subject) -> None:
    """Dropout acts on the attention weights, only in train mode: with value = identity, each
    output entry is either 0 or weight / (1 - p), and about a fraction p are dropped; the same
    seed repeats the same drop pattern, another seed changes it; in eval mode the output equals
    the same module built with dropout 0."""
    p, n = 0.5, 16
    m = s.build(heads=1, dropout=p, train=True)
    q, k, _ = s.inputs(1, 1, n, seed=3)
    eye = torch.eye(n, dtype=s.dtype, device=s.device)[None, None]  # (1, 1, Lk, Lk): out == weights
    sz = sizes_of(q, k, eye)
    w = m.attention_weights(q, k).double()
    torch.manual_seed(123)
    a = m(q, k, eye).double()
    torch.manual_seed(123)
    assert_equal(m(q, k, eye), a.to(s.dtype), what="train-mode output under the same seed", sizes=sz)
    torch.manual_seed(321)
    if torch.equal(m(q, k, eye).double(), a):
        raise CheckFailure(f"dropout gives the same output under two different seeds ({sz})")
    kept = a != 0
    zero = torch.zeros_like(a)
    assert_close(torch.where(kept, a, zero), torch.where(kept, w / (1 - p), zero),
                 what="kept weights (value = identity) vs weight / (1 - p)", sizes=sz, dtype=s.dtype)
    live = w != 0  # entries the variant's own pattern attends to
    frac = float((~kept & live).sum()) / max(1, int(live.sum()))
    if int(live.sum()) < 64:
        raise CheckFailure(f"only {int(live.sum())} non-zero weights without masks ({sz}); "
                           "cannot test dropout")
    if not 0.3 < frac < 0.7:  # >= 64 Bernoulli(0.5) draws: outside 0.3..0.7 is ~3.2+ sigma at 64, 6 at 256
        raise CheckFailure(f"dropout p={p} dropped a fraction {frac:.3f} of the weights ({sz})")
    plain = s.build(heads=1)
    assert_close(m.eval()(q, k, eye), plain(q, k, eye), what="eval-mode output vs the same module with "
                 "dropout 0", sizes=sz, dtype=s.dtype)


@check("config_round_trip", "config")
def config_round_trip(s: Subject) -> None:
    """``config.model_dump()`` -> ``attnreg.validate_config`` -> ``attnreg.build`` gives an equal
    config and (seeded) an identical module: same state_dict, same output; the JSON form round
    trips too; every alias builds the same variant; the config is frozen."""
    m = s.build()
    cfg = m.config
    data = cfg.model_dump()
    again = attnreg.validate_config(data)
    if again != cfg:
        raise CheckFailure(f"validate_config(model_dump()) gave {again!r}, expected {cfg!r}")
    if type(cfg).model_validate_json(cfg.model_dump_json()) != cfg:
        raise CheckFailure("the JSON round trip of the config changed it")
    torch.manual_seed(0)
    rebuilt = attnreg.build(data).to(device=s.device, dtype=s.dtype).eval()
    _same_state(rebuilt, m, "build(config.model_dump()) vs the original under the same seed")
    q, k, v = s.inputs(lq=7, seed=5)
    assert_equal(rebuilt(q, k, v), m(q, k, v), what="output of the rebuilt module", sizes=sizes_of(q, k, v))
    for alias in s.spec.aliases:
        built = attnreg.build({**data, "variant": alias})
        if built.config != cfg:
            raise CheckFailure(f"alias {alias!r} built config {built.config!r}, expected {cfg!r}")
    try:
        cfg.dropout = 0.5  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - pydantic raises ValidationError on frozen models
        pass
    else:
        raise CheckFailure(f"{type(cfg).__name__} is not frozen (assignment succeeded)")


@check("config_schema", "config")
def config_schema(s: Subject) -> None:
    """The config model is usable from files: a JSON schema is generated, every field has a
    description, every field but ``num_heads`` / ``head_dim`` has a default, an unknown field
    and an out-of-bounds ``dropout`` raise ``attnreg.ConfigError``."""
    model = s.spec.config
    try:
        model.model_json_schema()
    except Exception as err:  # noqa: BLE001
        raise CheckFailure(f"{model.__name__}.model_json_schema() failed: {err}") from err
    undocumented = [n for n, f in model.model_fields.items() if not (f.description or "").strip()]
    if undocumented:
        raise CheckFailure(f"{model.__name__} fields without a description: {undocumented}")
    exempt = ("num_heads", "head_dim", "variant")
    required = [n for n, f in model.model_fields.items() if f.is_required() and n not in exempt]
    if required:
        raise CheckFailure(f"{model.__name__} fields without a default: {required}")
    fields = s.shape_fields(H, E)
    expect_raises(ConfigError, lambda: attnreg.build(s.spec.name, **fields, no_such_field=1),
                  what="build with an unknown field", names=("no_such_field",))
    expect_raises(ConfigError, lambda: attnreg.build(s.spec.name, **fields, dropout=1.5),
                  what="build with dropout=1.5", names=("dropout",))


@check("scale_honoured", "config")
def scale_honoured(s: Subject) -> None:
    """The shared ``scale`` field is never silently ignored: ``scale=2.5`` either changes the
    output or is refused at build time with ``ConfigError`` / ``UnsupportedFeatureError``."""
    try:
        scaled = s.build(scale=2.5)
    except (ConfigError, UnsupportedFeatureError):
        return
    q, k, v = s.inputs(lq=7, seed=8)
    if torch.equal(scaled(q, k, v), s.build()(q, k, v)):
        raise CheckFailure(f"scale=2.5 gives the same output as the default scale ({sizes_of(q, k, v)})")


@check("state_dict_round_trip", "config")
def state_dict_round_trip(s: Subject) -> None:
    """``state_dict`` -> ``torch.save`` -> ``torch.load(weights_only=True)`` ->
    ``load_state_dict`` into a module built with another seed reproduces the outputs bit for bit;
    a deep copy does too."""
    a, b = s.build(seed=0), s.build(seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    q, k, v = s.inputs(lq=7, seed=9)
    kw = s.padding_and_causal(B, 7, seed=9)
    want = a(q, k, v, **kw)
    assert_equal(b(q, k, v, **kw), want, what="output after state_dict save/load", sizes=sizes_of(q, k, v))
    assert_equal(copy.deepcopy(a)(q, k, v, **kw), want, what="output of copy.deepcopy",
                 sizes=sizes_of(q, k, v))

