"""The ``attn_implementation`` keys attnreg registers, and the variant config each stands for.

A key is ``attnreg:<variant>`` (one per registered variant, or any ``attnreg:<suffix>`` given to
``register``) or the bare ``attnreg`` (variant named by the model config). The config of one
attention layer is the key's registration fields, plus the model config's ``attnreg`` dict,
plus the head count and size of the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnreg._configs import validate_config
from attnreg._plugins import REGISTRY
from attnreg.core import AttentionConfig, ConfigError

__all__ = ["BARE_KEY", "CONFIG_FIELD", "PREFIX", "KeyEntry", "add_key", "entry", "is_attnreg_key",
           "layer_config", "registered_keys"]

PREFIX = "attnreg:"
BARE_KEY = "attnreg"
# The model config attribute holding an attnreg config dict ({"variant": "local", "window": 64}).
CONFIG_FIELD = "attnreg"
# transformers passes these per call (the model's attention dropout and scaling): a config value
# would be overridden at every call, so setting one is an error rather than ignored.
MODEL_OWNED = {"dropout": "the model's attention dropout (passed per call)",
               "scale": "the model's `scaling` (passed per call)"}
# Sized from the attention layer: a config may state them only if it agrees.
LAYER_SIZED = ("num_heads", "head_dim")


@dataclass(frozen=True)
class KeyEntry:
    """One registered key: its variant (None for the bare key) and explicit config fields."""

    variant: str | None
    fields: Mapping[str, Any] = field(default_factory=dict)


_KEYS: dict[str, KeyEntry] = {}


def is_attnreg_key(key: object) -> bool:
    """Whether ``key`` (a ``config._attn_implementation``) names an attnreg implementation."""
    return isinstance(key, str) and (key == BARE_KEY or key.startswith(PREFIX))


def registered_keys() -> dict[str, KeyEntry]:
    """Every registered key and what it stands for (a copy)."""
    return dict(_KEYS)


def entry(key: str) -> KeyEntry:
    """The entry of a registered key; ``ConfigError`` naming ``register`` otherwise."""
    if key not in _KEYS:
        raise ConfigError(
            f"attn_implementation {key!r} is not registered; attnreg.integrations.transformers."
            f"register() adds one key per registered variant (registered now: {sorted(_KEYS)})"
        )
    return _KEYS[key]


def add_key(key: str, variant: str | None, fields: Mapping[str, Any]) -> KeyEntry:
    """Record ``key`` after checking ``fields`` against the variant's config."""
    if not is_attnreg_key(key) or key == PREFIX:
        raise ValueError(f"key must be 'attnreg' or start with {PREFIX!r} followed by a name, got {key!r}")
    fields = dict(fields)
    if variant is not None:
        _check_fields(variant, fields, f"register({variant!r}, ...)")
    _KEYS[key] = KeyEntry(variant, fields)
    return _KEYS[key]


def _check_fields(variant: str, fields: Mapping[str, Any], where: str) -> None:
    """Reject model-owned fields and validate the rest now (sizes filled with placeholders)."""
    owned = [f for f in MODEL_OWNED if f in fields]
    if owned:
        why = "; ".join(f"{f}: {MODEL_OWNED[f]}" for f in owned)
        raise ConfigError(f"{where} sets {owned}, which transformers decides ({why}); drop them")
    spec = REGISTRY.get(variant)
    sized = {f: 1 for f in LAYER_SIZED if f in spec.config.model_fields and f not in fields}
    validate_config({**fields, **sized, "variant": spec.name})


def layer_config(key: str, model_config: Any, num_heads: int, head_dim: int) -> AttentionConfig:
    """The attnreg config of one attention layer of a model whose ``attn_implementation`` is ``key``.

    Merges the key's registration fields with ``model_config.attnreg`` (a field given in both
    must agree; a ``variant`` there must be the key's), and fills ``num_heads``/``head_dim``
    where the variant's config has them (a stated value must agree with the layer).
    """
    ent = entry(key)
    raw = getattr(model_config, CONFIG_FIELD, None)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config.{CONFIG_FIELD} must be a dict of attnreg config fields, "
                          f"got {type(raw).__name__}")
    raw = dict(raw)
    named = raw.pop("variant", None)
    named = None if named is None else REGISTRY.get(named).name
    if ent.variant is None and named is None:
        raise ConfigError(f"attn_implementation='{BARE_KEY}' takes the variant from the model config: "
                          f"set config.{CONFIG_FIELD} = {{'variant': 'local', ...}} (or use "
                          f"attn_implementation='{PREFIX}<variant>')")
    if ent.variant is not None and named is not None and named != ent.variant:
        raise ConfigError(f"attn_implementation={key!r} selects '{ent.variant}' but config."
                          f"{CONFIG_FIELD}['variant'] is '{named}'; make them agree")
    variant = ent.variant or named
    assert variant is not None
    clash = {f: (ent.fields[f], v) for f, v in raw.items() if f in ent.fields and ent.fields[f] != v}
    if clash:
        raise ConfigError(f"config.{CONFIG_FIELD} and register({variant!r}, ...) disagree on "
                          + ", ".join(f"{f} ({a!r} registered, {b!r} in the model config)"
                                      for f, (a, b) in clash.items()))
    merged = {**ent.fields, **raw}
    _check_fields(variant, merged, f"config.{CONFIG_FIELD}")
    spec = REGISTRY.get(variant)
    for name, want in (("num_heads", num_heads), ("head_dim", head_dim)):
        if name not in spec.config.model_fields:
            continue
        if merged.get(name) is None:
            merged[name] = want
        elif merged[name] != want:
            raise ConfigError(f"the attnreg config of '{variant}' sets {name}={merged[name]!r}, but the "
                              f"model's attention layers have {name}={want}; drop {name} (it is filled "
                              "in from the model) or make them agree")
    return validate_config({**merged, "variant": variant})
