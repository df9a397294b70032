"""Building modules from configs: the three forms of ``build``, config files, the config union."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, ValidationError

from attnreg.core import Attention, AttentionConfig, ConfigError, PluginLoadError

from ._errors import config_error
from ._plugins import REGISTRY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _plain(obj: Any) -> Any:
    """Mappings -> dict and sequences -> list, recursively (OmegaConf/Hydra containers included)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def validate_config(data: Mapping[str, Any]) -> AttentionConfig:
    """Validate a mapping with a ``variant`` key (name or alias) into that variant's config."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"an attention config must be a mapping, got {type(data).__name__}")
    raw = _plain(data)
    if "variant" not in raw:
        raise ConfigError(
            f"config {raw!r} has no 'variant' key; add e.g. variant: dot_product "
            "(`attnreg list` shows the names)"
        )
    spec = REGISTRY.get(raw["variant"])
    raw["variant"] = spec.name
    try:
        return spec.config.model_validate(raw)
    except ValidationError as err:
        raise config_error(spec.name, spec.config, err) from None


def build(config: AttentionConfig | Mapping[str, Any] | str, /, **fields: Any) -> Attention:
    """Build an attention module from a config model, a mapping, or a name plus keyword fields.

        attnreg.build(LocalConfig(window=128))
        attnreg.build({"variant": "local", "window": 128})     # dict, OmegaConf DictConfig, ...
        attnreg.build("local", window=128)
    """
    if isinstance(config, str):
        cfg = validate_config({**fields, "variant": config})
    elif fields:
        raise ConfigError(
            "keyword fields are only accepted with a variant name: build('local', window=128)"
        )
    elif isinstance(config, AttentionConfig):
        spec = REGISTRY.get(config.variant)
        if not isinstance(config, spec.config):
            raise ConfigError(
                f"config {type(config).__name__} says variant '{config.variant}' but is not a "
                f"{spec.config.__name__}"
            )
        cfg = config
    elif isinstance(config, Mapping):
        cfg = validate_config(config)
    else:
        raise ConfigError(
            f"build() takes a config model, a mapping or a variant name, got {type(config).__name__}"
        )
    spec = REGISTRY.get(cfg.variant)
    module = spec.factory(cfg)
    if not isinstance(module, Attention):
        raise PluginLoadError(
            f"factory of variant '{spec.name}' ({REGISTRY.provider(spec.name)}) returned "
            f"{type(module).__name__}, expected an attnreg.core.Attention"
        )
    return module


def load_config(path: str | Path) -> AttentionConfig:
    """Read a config file (.yaml/.yml with the safe loader, .json, .toml) into a config model."""
    return validate_config(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file (.yaml/.yml with the safe loader, .json, .toml), not yet
    validated (``attnreg.MultiHeadAttention`` fills in the head sizes first)."""
    import yaml

    p = Path(path)
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(
                f"config file {str(p)!r}: unknown extension {suffix!r}; "
                "expected .yaml, .yml, .json or .toml"
            )
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} could not be parsed: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping with a 'variant' key, "
            f"got {type(data).__name__}"
        )
    return dict(data)


def _resolve_alias(data: Any) -> Any:
    if isinstance(data, Mapping) and isinstance(data.get("variant"), str):
        try:
            return {**_plain(data), "variant": REGISTRY.resolve(data["variant"])}
        except ConfigError:
            return data  # the union then reports the unknown tag with the allowed ones
    return data


def config_type() -> Any:
    """The discriminated union of every registered config model (tag: ``variant``).

    Use it as a field type in your own pydantic model: ``attention: attnreg.config_type()``.
    Aliases are accepted and resolved to canonical names.
    """
    models = tuple(spec.config for spec in REGISTRY.specs())
    if len(models) == 1:
        return Annotated[models[0], BeforeValidator(_resolve_alias)]
    return Annotated[Union[models], Field(discriminator="variant"), BeforeValidator(_resolve_alias)]  # noqa: UP007
