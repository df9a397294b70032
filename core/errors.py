"""Error types shared by attnreg, its plugins and its users.

Every error is an ``AttnRegError``; the ones caused by bad user input are also ``ValueError``
so that generic ``except ValueError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AttnRegError",
    "ConfigError",
    "DuplicateVariantError",
    "PluginLoadError",
    "UnknownVariantError",
    "UnsupportedFeatureError",
]


class AttnRegError(Exception):
    """Base class of every error raised by attnreg."""


class ConfigError(AttnRegError, ValueError):
    """A variant config is invalid: unknown field, value out of bounds, unreadable file."""


class UnknownVariantError(ConfigError, LookupError):
    """No registered variant (or alias) has the requested name."""


class UnsupportedFeatureError(AttnRegError, NotImplementedError):
    """A variant was asked for a feature its ``Capabilities`` declare unsupported."""

    def __init__(self, variant: str, feature: str, hint: str = "") -> None:
        self.variant = variant
        self.feature = feature
        msg = f"attention variant '{variant}' does not support {feature}"
        super().__init__(msg + (f": {hint}" if hint else ""))


class PluginLoadError(AttnRegError):
    """A plugin failed to import, raised in its hook, or returned an invalid spec."""


class DuplicateVariantError(AttnRegError):
    """A variant name or alias is already taken by another provider."""
