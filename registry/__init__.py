"""attnreg: a plugin-based registry of attention variants for PyTorch.

    import attnreg
    attn = attnreg.build("local", window=128)        # or a dict / config model / YAML file
    out = attn(q, k, v, key_mask=pad, is_causal=True)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from attnreg.core import (
    Attention,
    AttentionConfig,
    AttnRegError,
    Capabilities,
    ConfigError,
    DuplicateVariantError,
    Masks,
    PluginLoadError,
    UnknownVariantError,
    UnsupportedFeatureError,
    VariantSpec,
    hookimpl,
)

from ._configs import build, config_type, load_config, validate_config
from ._plugins import REGISTRY, PluginRecord

try:
    __version__ = version("attnreg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttnRegError",
    "Capabilities",
    "ConfigError",
    "DuplicateVariantError",
    "Masks",
    "PluginLoadError",
    "PluginRecord",
    "UnknownVariantError",
    "UnsupportedFeatureError",
    "VariantSpec",
    "__version__",
    "build",
    "config_type",
    "get_variant",
    "hookimpl",
    "list_variants",
    "load_config",
    "plugin_records",
    "register",
    "unregister",
    "validate_config",
]


def list_variants() -> list[str]:
    """Canonical names of every registered variant, sorted."""
    return [spec.name for spec in REGISTRY.specs()]


def get_variant(name: str) -> VariantSpec:
    """The ``VariantSpec`` of a variant name or alias (``UnknownVariantError`` if none)."""
    return REGISTRY.get(name)


def register(plugin: Any, name: str | None = None) -> list[VariantSpec]:
    """Register a plugin at runtime: a ``VariantSpec``, a list of them, or an object/module with
    an ``@attnreg.hookimpl`` ``attnreg_variants``. Taken names raise ``DuplicateVariantError``."""
    return REGISTRY.register(plugin, name)


def unregister(name: str) -> None:
    """Remove a runtime- or entry-point-registered variant (by name or alias)."""
    REGISTRY.unregister(name)


def plugin_records() -> list[PluginRecord]:
    """One record per plugin seen: loaded, failed (with the error) or filtered by the env."""
    return REGISTRY.records()
