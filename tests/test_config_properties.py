"""Property-based probes of every registered variant's config (hypothesis).

Fields, kinds and bounds are read from the config model (``config_fields``), so a new plugin is
probed without listing anything here. The properties:

- a valid value for each field (random subset, bounds included) builds an ``Attention`` whose
  config holds those values, unless a rule across fields refuses it (a ``ConfigError``) or the
  variant's capabilities exclude it (``UnsupportedFeatureError``, e.g. dropout in ``linear``),
  either naming one of the fields set;
- one invalid value (wrong type, bool, numeric string, out of bounds, inf/nan, huge int,
  unknown field) is a ``ConfigError`` naming that field;
- any JSON-like value in any field is either accepted or a ``ConfigError`` naming a field set;
- never another exception type, never pydantic's own text.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from config_fields import FieldKind, config_fields, minimal_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnreg
from attnreg import ConfigError, UnsupportedFeatureError

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = attnreg.list_variants()
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _ints(f: FieldKind) -> st.SearchStrategy[int]:
    lo, hi = f.smallest(), f.largest()
    small = st.integers(lo, min(hi, lo + 64))  # the sizes people use; builds stay cheap
    return st.one_of(small, st.sampled_from([lo, hi]), st.integers(lo, hi))


def _floats(f: FieldKind) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=f.lo, max_value=f.hi, exclude_min=f.lo_strict and f.lo is not None,
        exclude_max=f.hi_strict and f.hi is not None, allow_nan=False, allow_infinity=False,
    )


def valid(f: FieldKind) -> st.SearchStrategy[Any] | None:
    """Values of ``f`` its own bounds allow; None for kinds not generated here (nested data)."""
    strat: st.SearchStrategy[Any] | None = {
        "int": _ints(f) if f.kind == "int" else None,
        "float": _floats(f) if f.kind == "float" else None,
        "literal": st.sampled_from(f.choices) if f.choices else None,
        "bool": st.booleans(),
        "str": st.text(max_size=8),
    }.get(f.kind)
    if strat is not None and f.optional:
        strat = st.one_of(st.none(), strat)
    return strat


def _outside(f: FieldKind) -> list[st.SearchStrategy[Any]]:
    """Numbers of the right type outside the field's bounds."""
    out: list[st.SearchStrategy[Any]] = []
    if f.kind == "int":
        out.append(st.integers(max_value=f.smallest() - 1))
        out.append(st.one_of(st.integers(min_value=f.largest() + 1), st.sampled_from([2**63, 10**100])))
    else:
        if f.lo is not None:
            out.append(st.floats(max_value=f.lo, exclude_max=not f.lo_strict, allow_nan=False,
                                 allow_infinity=False))
        if f.hi is not None:
            out.append(st.floats(min_value=f.hi, exclude_min=not f.hi_strict, allow_nan=False,
                                 allow_infinity=False))
    return out


def invalid(f: FieldKind) -> st.SearchStrategy[Any]:
    """Values no config of this field may accept."""
    weird = st.sampled_from([{1, 2}, b"bytes", object()])  # never config data, whatever the type
    options: list[st.SearchStrategy[Any]] = [weird]
    if not f.optional and not f.required:
        options.append(st.none())
    if f.kind in ("int", "float"):
        options += [st.booleans(), st.text(alphabet="0123456789.e-", min_size=1, max_size=6),
                    st.lists(st.integers(), max_size=2), *_outside(f)]
        if f.kind == "int":
            options.append(st.floats(allow_nan=True, allow_infinity=True))  # 3.0 included: no coercion
        else:
            options.append(st.sampled_from([math.inf, -math.inf, math.nan]))
    elif f.kind == "literal":
        options += [st.text(max_size=8).filter(lambda s: s not in f.choices), st.integers(), st.booleans()]
    elif f.kind == "bool":
        options += [st.integers(), st.text(max_size=4), st.floats()]
    elif f.kind == "str":
        options += [st.integers(), st.booleans(), st.floats()]
    return st.one_of(options)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


def _check_error(err: ConfigError, names: list[str], quoted: bool) -> None:
    msg = str(err)
    assert "pydantic" not in msg and len(msg) < 4000, msg
    wanted = [f"'{n}'" for n in names] if quoted else names
    assert any(w in msg for w in wanted), (names, msg)


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(data=st.data())
def test_valid_fields_build_or_a_cross_field_rule_names_them(variant: str, data: st.DataObject) -> None:
    chosen = {}
    for f in config_fields(variant):
        strat = valid(f)
        if strat is not None and data.draw(st.booleans(), label=f"set {f.name}"):
            chosen[f.name] = data.draw(strat, label=f.name)
    cfg = {**minimal_config(variant), **chosen}
    try:
        module = attnreg.build(cfg)
    except (ConfigError, UnsupportedFeatureError) as err:
        # a rule across fields (an even bigbird window, scale with linear's elu map), or a feature
        # the variant's capabilities exclude (dropout in linear): either names a field set
        _check_error(err, [*chosen], quoted=False)
        return
    assert isinstance(module, attnreg.Attention)
    for name, value in chosen.items():
        assert getattr(module.config, name) == value, name


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(data=st.data())
def test_an_invalid_field_is_a_config_error_naming_it(variant: str, data: st.DataObject) -> None:
    fields = config_fields(variant)
    f = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(invalid(f), label="value")
    with pytest.raises(ConfigError) as info:
        attnreg.build({**minimal_config(variant), f.name: value})
    _check_error(info.value, [f.name], quoted=True)


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(name=st.from_regex(r"[a-z][a-z_0-9]{0,11}", fullmatch=True), value=JSON)
def test_an_unknown_field_is_named(variant: str, name: str, value: Any) -> None:
    if name in attnreg.get_variant(variant).config.model_fields:
        return
    with pytest.raises(ConfigError, match=f"unknown field '{name}'"):
        attnreg.build({**minimal_config(variant), name: value})


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(data=st.data())
def test_any_json_value_is_accepted_or_a_config_error(variant: str, data: st.DataObject) -> None:
    fields = [f.name for f in config_fields(variant)]
    names = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True), label="fields")
    values = {n: data.draw(JSON, label=n) for n in names}
    try:
        module = attnreg.build({**minimal_config(variant), **values})
    except (ConfigError, UnsupportedFeatureError) as err:
        _check_error(err, names, quoted=False)
    else:
        assert isinstance(module, attnreg.Attention)
