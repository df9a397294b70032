"""Config bounds and strict types, over every registered variant: finite floats, bounded ints, no
bool/str/float coercion into numbers, one variant per build, readable errors only."""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import pytest
import torch
from config_fields import FieldKind, config_fields, minimal_config

import attnreg
from attnreg import ConfigError
from attnreg.plugins.dot_product import DotProductConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = attnreg.list_variants()
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _fields(kind: str) -> list[tuple[str, FieldKind]]:
    return [(v, f) for v in VARIANTS for f in config_fields(v) if f.kind == kind]


def _ids(params: list[tuple[str, FieldKind]]) -> list[str]:
    return [f"{v}.{f.name}" for v, f in params]


def _refused(variant: str, field: str, value: object) -> str:
    """Validate ``field=value`` on the variant's minimal config: a ConfigError naming the field,
    short, with no pydantic internals."""
    with pytest.raises(ConfigError) as info:
        attnreg.validate_config({**minimal_config(variant), field: value})
    msg = str(info.value)
    assert f"'{field}'" in msg, msg
    assert "pydantic" not in msg and len(msg) < 2000, msg
    return msg


INTS, FLOATS = _fields("int"), _fields("float")
HUGE = pytest.param(10**5000, id="10**5000")


@pytest.mark.parametrize("variant,f", FLOATS, ids=_ids(FLOATS))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_float_fields_refuse_inf_and_nan(variant: str, f: FieldKind, value: float) -> None:
    _refused(variant, f.name, value)


@pytest.mark.parametrize("variant,f", FLOATS, ids=_ids(FLOATS))
@pytest.mark.parametrize("value", [True, False, "0.5", pytest.param(10**400, id="10**400")])
def test_float_fields_refuse_bools_strings_and_huge_ints(variant: str, f: FieldKind, value) -> None:
    msg = _refused(variant, f.name, value)
    if isinstance(value, bool):
        assert "true/false is not a number" in msg


@pytest.mark.parametrize("variant,f", INTS, ids=_ids(INTS))
def test_int_fields_are_bounded_for_torch(variant: str, f: FieldKind) -> None:
    """Every int field has bounds; sizes fit an int32 index, seeds (hashed, never an index) int64."""
    assert f.lo is not None and f.hi is not None, f"{variant}.{f.name} needs ge/gt and le/lt bounds"
    assert f.largest() <= (INT64_MAX if f.name == "seed" else INT32_MAX), f


@pytest.mark.parametrize("variant,f", INTS, ids=_ids(INTS))
@pytest.mark.parametrize("value", [True, False, "3", 3.0, 2.5, "past", 2**63, HUGE,
                                   pytest.param(-(10**5000), id="-10**5000")])
def test_int_fields_refuse_bools_strings_floats_and_huge(variant: str, f: FieldKind, value) -> None:
    value = f.largest() + 1 if value == "past" else value
    msg = _refused(variant, f.name, value)
    if isinstance(value, bool):
        assert "true/false is not a number" in msg


@pytest.mark.parametrize("variant", VARIANTS)
def test_scale_inf_is_refused_by_build(variant: str) -> None:
    with pytest.raises(ConfigError, match="'scale' = inf is invalid: Input should be a finite number"):
        attnreg.build({**minimal_config(variant), "scale": math.inf})


SCALE_MAX = 65504.0  # float16's largest value


@pytest.mark.parametrize("variant", VARIANTS)
def test_scale_is_bounded_and_its_largest_value_stays_finite(variant: str) -> None:
    """A finite scale too large for the compute dtype was accepted: scale=1e300 gave all-NaN
    outputs in float32 and bfloat16 for every variant, and scale=2**64 NaN gradients in float64
    for sparse and bigbird at L = 1 (SDPA's backward recomputes the huge logits with another
    rounding; found by tests/test_properties.py). The largest scale allowed gives finite outputs
    in float64, float32 and bfloat16 and finite float64 gradients."""
    for value in (math.nextafter(SCALE_MAX, math.inf), 2.0**64, 1e300):
        _refused(variant, "scale", value)
    spec = attnreg.get_variant(variant)
    ran = 0
    for overrides in ({}, *spec.check_configs):
        try:  # linear's elu and relu maps refuse any scale (a rule across fields)
            cfg = attnreg.validate_config({**minimal_config(variant), **overrides, "scale": SCALE_MAX})
        except ConfigError as err:
            assert "scale" in str(err), str(err)
            continue
        heads, dim = getattr(cfg, "num_heads", None) or 2, getattr(cfg, "head_dim", None) or 4
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            attn = attnreg.build(cfg).to(dtype)
            for n in (1, 7):
                g = torch.Generator().manual_seed(n)
                q, k, v = (torch.randn(1, heads, n, dim, generator=g, dtype=dtype).requires_grad_()
                           for _ in range(3))
                out = attn(q, k, v, is_causal=n > 1)
                assert bool(out.isfinite().all()), (overrides, dtype, n)
                if dtype == torch.float64:
                    grads = torch.autograd.grad(out.sum(), (q, k, v))
                    assert all(bool(t.isfinite().all()) for t in grads), (overrides, n)
        ran += 1
    assert ran, f"no config of {variant} accepts scale={SCALE_MAX}"


def test_scale_bound_holds_where_a_plugin_redeclares_the_field() -> None:
    class MyConfig(attnreg.AttentionConfig):
        variant: Literal["mine"] = "mine"
        scale: float | None = pydantic.Field(None, gt=0.0, description="no upper bound here")

    assert MyConfig(scale=SCALE_MAX).scale == SCALE_MAX
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 65504"):
        MyConfig(scale=1e5)


def _tiny_forward(cfg: attnreg.AttentionConfig) -> None:
    """Build ``cfg`` and run it on a 5-token input sized by the config; the output is finite."""
    attn = attnreg.build(cfg)
    heads = getattr(cfg, "num_heads", None) or 2
    dim = getattr(cfg, "head_dim", None) or 4
    q, k, v = (torch.randn(1, heads, 5, dim, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = attn(q, k, v)
    assert out.shape == (1, heads, 5, dim) and bool(out.isfinite().all())


@pytest.mark.parametrize("variant,f", INTS, ids=_ids(INTS))
def test_int_fields_at_their_bounds_build_and_run(variant: str, f: FieldKind) -> None:
    """Both ends of every int range are usable (or refused by a check that names the field):
    ``window=2**31 - 1`` is full attention, not an overflow at forward."""
    for value in (f.smallest(), f.largest()):
        try:
            cfg = attnreg.validate_config({**minimal_config(variant), f.name: value})
        except ConfigError as err:  # a cross-field rule (odd window, parameter budget, ...)
            assert f.name in str(err), str(err)
            continue
        _tiny_forward(cfg)


def test_huge_window_is_full_attention() -> None:
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    wide = attnreg.build("local", window=INT32_MAX)
    full = attnreg.build("dot_product")
    for causal in (False, True):
        torch.testing.assert_close(wide(q, k, v, is_causal=causal), full(q, k, v, is_causal=causal),
                                   rtol=0, atol=1e-12)
    _refused("local", "window", 2**63)


def test_additive_parameter_budget() -> None:
    budget = r"num_heads \* head_dim \* hidden_dim = 1 \* 8192 \* 8192 .* 2\*\*24"
    with pytest.raises(ConfigError, match=budget):
        attnreg.build("additive", num_heads=1, head_dim=8192)  # hidden_dim defaults to head_dim
    attnreg.validate_config({"variant": "additive", "num_heads": 4, "head_dim": 64, "hidden_dim": 4096})


def test_build_refuses_a_second_variant() -> None:
    with pytest.raises(ConfigError, match=r"build\('local', variant='sparse'\) names two variants"):
        attnreg.build("local", variant="sparse")
    with pytest.raises(ConfigError, match="names two variants"):
        attnreg.build("local", variant="nope")
    assert attnreg.build("sdpa", variant="dot_product").config == DotProductConfig()  # one variant


@pytest.mark.parametrize("variant", [3, None, ["dot_product"], {"a": 1}, True, HUGE])
def test_variant_of_the_wrong_type(variant: object) -> None:
    with pytest.raises(ConfigError, match="unknown attention variant") as info:
        attnreg.validate_config({"variant": variant})
    assert len(str(info.value)) < 2000


def test_python_mappings_are_bounded_too() -> None:
    loop: dict = {"variant": "dot_product"}
    loop["x"] = loop
    with pytest.raises(ConfigError, match="nested deeper than"):
        attnreg.validate_config(loop)
    with pytest.raises(ConfigError, match="key '1' twice"):
        attnreg.validate_config({"variant": "dot_product", 1: 0, "1": 0})


def test_the_config_union_is_strict_too() -> None:
    class ModelConfig(pydantic.BaseModel):
        attention: attnreg.config_type()  # type: ignore[valid-type]

    assert ModelConfig.model_validate({"attention": {"variant": "window", "window": 3}})
    for bad in ({"window": True}, {"window": "3"}, {"window": 2**63}, {"scale": math.inf}):
        with pytest.raises(pydantic.ValidationError):
            ModelConfig.model_validate({"attention": {"variant": "local", **bad}})


def test_ints_are_floats_but_not_the_reverse() -> None:
    """What a careful user expects from YAML: ``scale: 1`` is 1.0, ``window: 128.0`` is an error."""
    assert attnreg.validate_config({"variant": "local", "scale": 1}).scale == 1.0
    msg = _refused("local", "window", 128.0)
    assert "whole number" in msg
