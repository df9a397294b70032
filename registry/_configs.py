"""Building modules from configs: the three forms of ``build``, config files, the config union."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field, ValidationError

from attnreg.core import Attention, AttentionConfig, ConfigError, PluginLoadError

from ._config_files import MAX_CONFIG_DEPTH, read_config_file
from ._errors import config_error, short_repr
from ._plugins import REGISTRY

__all__ = ["build", "config_type", "load_config", "read_config_file", "validate_config"]


def _plain(obj: Any, where: str = "config", depth: int = 1) -> Any:
    """Mappings -> dict and sequences -> list, recursively (OmegaConf/Hydra containers included).

    Refuses nesting deeper than ``MAX_CONFIG_DEPTH`` (a self-referencing container included) and
    keys that collide once turned into strings (``1`` and ``"1"``).
    """
    container = isinstance(obj, (Mapping, Sequence)) and not isinstance(obj, (str, bytes))
    if container and depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where} is nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            key = str(k)
            if key in out:
                raise ConfigError(f"{where} has the key {key!r} twice ({short_repr(k)} once as a string)")
            out[key] = _plain(v, f"{where}.{key}" if where != "config" else key, depth + 1)
        return out
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v, where, depth + 1) for v in obj]
    return obj


def validate_config(data: Mapping[str, Any]) -> AttentionConfig:
    """Validate a mapping with a ``variant`` key (name or alias) into that variant's config."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"an attention config must be a mapping, got {type(data).__name__}")
    raw = _plain(data)
    if "variant" not in raw:
        raise ConfigError(
            f"config {short_repr(raw)} has no 'variant' key; add e.g. variant: dot_product "
            "(`attnreg list` shows the names)"
        )
    spec = REGISTRY.get(raw["variant"])
    raw["variant"] = spec.name
    try:
        return spec.config.model_validate(raw)
    except ValidationError as err:
        raise config_error(spec.name, spec.config, err) from None


def _canonical(name: object) -> object:
    """The canonical name of a variant name or alias; the input itself when it names none."""
    try:
        return REGISTRY.resolve(name)  # type: ignore[arg-type]
    except ConfigError:
        return name


def build(config: AttentionConfig | Mapping[str, Any] | str, /, **fields: Any) -> Attention:
    """Build an attention module from a config model, a mapping, or a name plus keyword fields.

        attnreg.build(LocalConfig(window=128))
        attnreg.build({"variant": "local", "window": 128})     # dict, OmegaConf DictConfig, ...
        attnreg.build("local", window=128)
    """
    if isinstance(config, str):
        if "variant" in fields and _canonical(fields["variant"]) != _canonical(config):
            other = short_repr(fields["variant"])
            raise ConfigError(
                f"build({config!r}, variant={other}) names two variants; give the variant once: "
                f"build({other}, ...) or build({config!r}, ...)"
            )
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
    """Read a config file (.yaml/.yml with the safe loader, .json, .toml) into a config model.

    Every problem is a ``ConfigError`` that names the file (see ``read_config_file`` for the
    limits on files).
    """
    data = read_config_file(path)
    try:
        return validate_config(data)
    except ConfigError as err:
        raise type(err)(f"config file {str(Path(path))!r}: {err}") from None


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
