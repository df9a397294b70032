"""attnreg: a plugin-based registry of attention variants for PyTorch.

    import attnreg
    attn = attnreg.build("local", window=128)        # or a dict / config model / YAML file
    out = attn(q, k, v, key_mask=pad, is_causal=True)
    mha = attnreg.MultiHeadAttention(256, num_heads=8, attention="local")   # (B, L, 256) layer
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# ``import attnreg`` stays cheap (no torch): the pytest11 conformance plugin is a submodule and
# is imported by every pytest run of an environment where attnreg is installed. Everything below
# is resolved on first attribute access (PEP 562).
if TYPE_CHECKING:
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
    from ._errors import PluginWarning
    from ._plugins import REGISTRY, PluginRecord  # noqa: F401
    from .multihead import MultiHeadAttention

_LAZY = {
    **{n: "attnreg.core" for n in (
        "Attention", "AttentionConfig", "AttnRegError", "Capabilities", "ConfigError",
        "DuplicateVariantError", "Masks", "PluginLoadError", "UnknownVariantError",
        "UnsupportedFeatureError", "VariantSpec", "hookimpl",
    )},
    **{n: "attnreg._configs" for n in ("build", "config_type", "load_config", "validate_config")},
    **{n: "attnreg._plugins" for n in ("REGISTRY", "PluginRecord")},
    "PluginWarning": "attnreg._errors",
    "MultiHeadAttention": "attnreg.multihead",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups (and the functions below) skip this hook
        return value
    raise AttributeError(f"module 'attnreg' has no attribute {name!r}")


def _registry() -> Any:
    return __getattr__("REGISTRY")


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
    "MultiHeadAttention",
    "PluginLoadError",
    "PluginRecord",
    "PluginWarning",
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
    return [spec.name for spec in _registry().specs()]


def get_variant(name: str) -> VariantSpec:
    """The ``VariantSpec`` of a variant name or alias (``UnknownVariantError`` if none)."""
    return _registry().get(name)


def register(plugin: Any, name: str | None = None) -> list[VariantSpec]:
    """Register a plugin at runtime: a ``VariantSpec``, a list of them, or an object/module with
    an ``@attnreg.hookimpl`` ``attnreg_variants``. Taken names raise ``DuplicateVariantError``."""
    return _registry().register(plugin, name)


def unregister(name: str) -> None:
    """Remove a runtime- or entry-point-registered variant (by name or alias)."""
    _registry().unregister(name)


def plugin_records() -> list[PluginRecord]:
    """One record per plugin seen: loaded, failed (with the error) or filtered by the env."""
    return _registry().records()
