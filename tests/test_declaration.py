"""One declaration per variant: the config's ``variant: Literal["name"]`` names it, the module class
carries ``config_class`` and ``capabilities``, ``VariantSpec.of`` derives the spec. The explicit
``VariantSpec(name=..., ...)`` form of published plugins keeps working. Also the author's surface
of ``attnreg.core``: public names only, each documented, the hook machinery private."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from conformance_toys import Textbook
from pydantic import Field

import attnreg
import attnreg.core
from attnreg.conformance import CheckFailure, run_check
from attnreg.core import (
    Attention,
    AttentionConfig,
    Capabilities,
    VariantSpec,
    accum_dtype,
    dot_product_logits,
    masked_softmax,
)

CAPS = Capabilities(causal=True, complexity="O(L^2*E)")


class DeclaredConfig(AttentionConfig):
    variant: Literal["declared_once"]
    temperature: float = Field(1.0, gt=0, description="Divides the logits.")


class DeclaredAttention(Attention):
    config_class = DeclaredConfig
    capabilities = CAPS

    def _weights(self, query: torch.Tensor, key: torch.Tensor, masks: attnreg.Masks) -> torch.Tensor:
        logits = dot_product_logits(query, key, self.scale) / self.config.temperature  # (B, H, Lq, Lk)
        return masked_softmax(logits, masks.allowed(query.device))

    def _attend(self, query, key, value, masks):  # type: ignore[no-untyped-def]
        return self._weights(query, key, masks) @ value  # (B, H, Lq, Ev)


def test_the_name_is_written_once_and_derived_everywhere() -> None:
    assert DeclaredAttention.variant == "declared_once"
    assert DeclaredConfig().variant == "declared_once"  # the Literal is the default too
    assert DeclaredConfig.model_fields["variant"].description
    spec = VariantSpec.of(DeclaredAttention, summary="s", reference="r", aliases=("once",),
                          check_configs=({"temperature": 2.0},))
    assert (spec.name, spec.config, spec.factory, spec.capabilities) == (
        "declared_once", DeclaredConfig, DeclaredAttention, CAPS)
    assert spec.aliases == ("once",) and dict(spec.check_configs[0]) == {"temperature": 2.0}
    attnreg.register(spec)
    try:
        attn = attnreg.build("once", temperature=2.0)
        assert type(attn) is DeclaredAttention and attn.variant == "declared_once"
        q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
        expected = attnreg.build("sdpa", scale=0.5 / 2.0)(q, q, q, is_causal=True)
        assert torch.allclose(attn(q, q, q, is_causal=True), expected, atol=1e-12)
        run_check("declared_once", "spec_metadata")
    finally:
        attnreg.unregister("declared_once")


def _example_plugin_spec() -> VariantSpec:
    """The example plugin's spec, imported from its source tree: CI installs the example only
    after the test suite, so the registry may not know ``sigmoid`` here."""
    src = str(Path(__file__).resolve().parents[1] / "examples" / "attnreg-example-plugin" / "src")
    sys.path.insert(0, src)
    try:
        return importlib.import_module("attnreg_sigmoid").SPEC
    finally:
        sys.path.remove(src)


def test_each_builtin_spec_is_derived_from_its_class() -> None:
    names = ("dot_product", "additive", "local", "linear", "performer", "sparse", "bigbird")
    for name, spec in [(n, attnreg.get_variant(n)) for n in names] + [("sigmoid", _example_plugin_spec())]:
        cls = spec.factory
        assert isinstance(cls, type) and issubclass(cls, Attention), name
        assert cls.config_class is spec.config and cls.variant == spec.name, name
        assert cls.capabilities is spec.capabilities, name


def test_a_subclass_inherits_the_declaration() -> None:
    class Tweaked(DeclaredAttention):
        pass

    assert Tweaked.variant == "declared_once" and Tweaked.config_class is DeclaredConfig
    assert VariantSpec.of(Tweaked, summary="s", reference="r").factory is Tweaked


def test_a_class_without_config_class_cannot_derive_a_spec() -> None:
    class NoConfig(Attention):
        capabilities = CAPS

    with pytest.raises(TypeError, match=r"VariantSpec.of\(.*NoConfig\): the class declares no config_class"):
        VariantSpec.of(NoConfig, summary="s", reference="r")
    with pytest.raises(TypeError, match="expected an Attention subclass"):
        VariantSpec.of(DeclaredConfig, summary="s", reference="r")  # type: ignore[arg-type]


class StrVariantConfig(AttentionConfig):
    variant: str = Field("str_variant", description="not a Literal")


class TwoNamesConfig(AttentionConfig):
    variant: Literal["one", "two"] = Field("one", description="two names")


@pytest.mark.parametrize("config", [StrVariantConfig, TwoNamesConfig, AttentionConfig])
def test_a_config_whose_variant_is_not_one_literal_is_refused(config: type[AttentionConfig]) -> None:
    with pytest.raises(TypeError, match=r"BadVariant.config_class .* must declare its variant as one name"):
        type("BadVariant", (Attention,), {"config_class": config, "capabilities": CAPS})


def test_config_class_must_be_a_config_and_the_name_is_not_repeated() -> None:
    with pytest.raises(TypeError, match="NotAConfig.config_class must be a subclass of AttentionConfig"):
        type("NotAConfig", (Attention,), {"config_class": dict})
    with pytest.raises(TypeError, match="Twice sets both config_class and variant"):
        type("Twice", (Attention,), {"config_class": DeclaredConfig, "variant": "declared_once"})


def test_a_module_refuses_the_config_of_another_variant() -> None:
    with pytest.raises(TypeError, match="DeclaredAttention needs a DeclaredConfig, got DotProductConfig"):
        DeclaredAttention(attnreg.get_variant("dot_product").config())


def test_the_explicit_form_is_still_accepted_and_validated() -> None:
    class OldConfig(AttentionConfig):
        variant: Literal["old_style"] = Field("old_style", description="Variant name.")

    class OldStyle(Textbook):
        variant = "old_style"

    assert OldStyle.config_class is None  # an explicit name: the config comes from the spec
    spec = VariantSpec(name="old_style", config=OldConfig, factory=OldStyle,
                       capabilities=OldStyle.capabilities, summary="s", reference="r")
    attnreg.register(spec)
    try:
        assert isinstance(attnreg.build("old_style"), OldStyle)
        run_check("old_style", "spec_metadata")
    finally:
        attnreg.unregister("old_style")
    with pytest.raises(TypeError, match=r"OldConfig.variant must be declared as Literal\['other'\]"):
        VariantSpec(name="other", config=OldConfig, factory=OldStyle, capabilities=OldStyle.capabilities,
                    summary="s", reference="r")


def test_spec_metadata_catches_an_explicit_spec_that_drifted_from_its_module() -> None:
    class DriftConfig(AttentionConfig):
        variant: Literal["drifted"]

    class Drifted(Textbook):
        variant = "drifted"

    wrong_caps = Capabilities(causal=True, key_mask=True, complexity="O(L^2*E)")
    spec = VariantSpec(name="drifted", config=DriftConfig, factory=Drifted, capabilities=wrong_caps,
                       summary="s", reference="r")
    attnreg.register(spec)
    try:
        with pytest.raises(CheckFailure, match="spec.capabilities and Drifted.capabilities differ"):
            run_check("drifted", "spec_metadata")
    finally:
        attnreg.unregister("drifted")


# -- the author's surface ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,want", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_accum_dtype(dtype: torch.dtype, want: torch.dtype) -> None:
    assert accum_dtype(dtype) is want
    assert accum_dtype(torch.zeros(2, dtype=dtype)) is want
    assert Attention._accum_dtype(dtype) is want  # the name plugins published before it used


def test_core_exports_the_authors_surface_each_documented() -> None:
    names = set(attnreg.core.__all__)
    assert not names & {"hookspec", "AttnregHookSpecs", "PROJECT_NAME"}
    assert {"hookimpl", "accum_dtype", "Attention", "AttentionConfig", "Capabilities", "VariantSpec",
            "Baseline"} <= names
    for name in sorted(names):
        doc = inspect.getdoc(getattr(attnreg.core, name))
        assert doc and doc.strip(), f"attnreg.core.{name} has no docstring"
    for hook in ("pattern_mask", "flops", "benchmark_baselines"):
        assert "benchmark" in (inspect.getdoc(getattr(Attention, hook)) or ""), hook
