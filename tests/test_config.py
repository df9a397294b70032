"""Configs: build forms, file formats, clear errors, the discriminated union."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pydantic
import pytest

import attnreg
from attnreg import ConfigError, UnknownVariantError
from attnreg.plugins.dot_product import DotProductConfig


class FrozenMapping(Mapping):
    """A non-dict Mapping, like OmegaConf's DictConfig."""

    def __init__(self, data: dict) -> None:
        self._data = data

    def __getitem__(self, key: str) -> object:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_any_mapping_builds() -> None:
    m = attnreg.build(FrozenMapping({"variant": "sdpa", "dropout": 0.1}))
    assert m.config == DotProductConfig(dropout=0.1)


def test_config_model_builds_and_is_frozen() -> None:
    cfg = DotProductConfig(scale=0.5)
    assert attnreg.build(cfg).config is cfg
    with pytest.raises(pydantic.ValidationError):
        cfg.scale = 1.0  # type: ignore[misc]


def test_unknown_variant_lists_names_and_closest() -> None:
    with pytest.raises(UnknownVariantError) as info:
        attnreg.build({"variant": "dot_prodcut"})
    msg = str(info.value)
    assert "Did you mean 'dot_product'?" in msg and "sdpa" in msg and "dot_product" in msg
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownVariantError, match="Did you mean 'dot_product'"):
        attnreg.get_variant("dotproduct")


def test_unknown_field_names_variant_field_and_closest() -> None:
    with pytest.raises(ConfigError) as info:
        attnreg.build("dot_product", dropuot=0.1)
    msg = str(info.value)
    assert "'dot_product'" in msg and "'dropuot'" in msg and "did you mean 'dropout'?" in msg
    assert "pydantic" not in msg


@pytest.mark.parametrize(
    "field,value,bound",
    [("dropout", 1.5, "dropout < 1.0"), ("dropout", -0.1, "dropout >= 0.0"), ("scale", -1, "scale > 0.0")],
)
def test_out_of_range_value_names_field_value_and_bound(field: str, value: float, bound: str) -> None:
    with pytest.raises(ConfigError) as info:
        attnreg.build({"variant": "dot_product", field: value})
    msg = str(info.value)
    assert f"'{field}' = {value!r}" in msg and bound in msg and "pydantic" not in msg


def test_wrong_type_and_missing_variant() -> None:
    with pytest.raises(ConfigError, match="'scale' = 'big'"):
        attnreg.build("dot_product", scale="big")
    with pytest.raises(ConfigError, match="has no 'variant' key"):
        attnreg.build({"dropout": 0.1})
    with pytest.raises(ConfigError, match="only accepted with a variant name"):
        attnreg.build({"variant": "sdpa"}, dropout=0.1)
    with pytest.raises(ConfigError, match="got int"):
        attnreg.build(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,text",
    [
        ("a.yaml", "variant: sdpa\ndropout: 0.25\n"),
        ("a.yml", "variant: dot_product\ndropout: 0.25\n"),
        ("a.json", '{"variant": "dot_product", "dropout": 0.25}'),
        ("a.toml", 'variant = "scaled_dot_product"\ndropout = 0.25\n'),
    ],
)
def test_load_config_formats(tmp_path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert attnreg.load_config(path) == DotProductConfig(dropout=0.25)


def test_load_config_rejects_python_tags_and_bad_files(tmp_path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("variant: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        attnreg.load_config(evil)
    obj = tmp_path / "obj.yaml"
    obj.write_text("!!python/object:collections.OrderedDict {}\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        attnreg.load_config(obj)
    with pytest.raises(ConfigError, match="unknown extension '.ini'"):
        (tmp_path / "a.ini").write_text("x")
        attnreg.load_config(tmp_path / "a.ini")
    with pytest.raises(ConfigError, match="cannot read config file"):
        attnreg.load_config(tmp_path / "missing.yaml")
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        attnreg.load_config(lst)


def test_config_type_is_a_discriminated_union_usable_in_user_models() -> None:
    class ModelConfig(pydantic.BaseModel):
        d_model: int = 64
        attention: attnreg.config_type()  # type: ignore[valid-type]

    cfg = ModelConfig.model_validate({"attention": {"variant": "sdpa", "dropout": 0.1}})
    assert cfg.attention == DotProductConfig(dropout=0.1)
    assert isinstance(attnreg.build(cfg.attention), attnreg.Attention)
    with pytest.raises(pydantic.ValidationError):
        ModelConfig.model_validate({"attention": {"variant": "nope"}})
    with pytest.raises(pydantic.ValidationError):
        ModelConfig.model_validate({"attention": {"variant": "dot_product", "window": 3}})


def test_config_round_trip() -> None:
    for name in attnreg.list_variants():
        spec = attnreg.get_variant(name)
        fields = {f: 4 for f in ("num_heads", "head_dim") if f in spec.config.model_fields}
        cfg = attnreg.validate_config({"variant": name, **fields})
        assert attnreg.validate_config(cfg.model_dump()) == cfg
        assert attnreg.validate_config(cfg.model_dump(mode="json")) == cfg
