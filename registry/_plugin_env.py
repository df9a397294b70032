"""What plugin loading keeps and reads: the record per plugin, the environment switches, the
entry points and their distributions."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any

from attnreg.core import VariantSpec

from ._isolation import normalize_name

__all__ = ["BUILTIN_DIST", "ENTRY_POINT_GROUP", "ENV_ALLOW", "ENV_DISABLE", "ENV_STRICT", "PluginRecord",
           "Running", "State", "allow_list", "dist_label", "dist_name", "env_flag", "env_switches",
           "is_builtin"]

ENTRY_POINT_GROUP = "attnreg"
BUILTIN_DIST = "attnreg"
ENV_DISABLE = "ATTNREG_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "ATTNREG_PLUGINS"
ENV_STRICT = "ATTNREG_STRICT_PLUGINS"


@dataclass
class PluginRecord:
    """What happened to one plugin: where it came from, what it provided, or why it failed."""

    name: str
    provider: str  # distribution name and version, or "runtime"
    target: str  # "module:attr" of the entry point, or the registered object's repr
    status: str = "pending"  # loaded | failed | filtered | unregistered
    variants: tuple[str, ...] = ()
    error: str | None = None
    warnings: tuple[str, ...] = ()  # what it did while loading that it must not (strict: an error)
    plugin: Any = field(default=None, repr=False, compare=False)  # the object registered with pluggy


@dataclass
class State:
    """Everything registered: specs, names and aliases, providers, one record per plugin seen."""

    specs: dict[str, VariantSpec] = field(default_factory=dict)  # canonical name -> spec
    names: dict[str, str] = field(default_factory=dict)  # name or alias -> canonical name
    providers: dict[str, str] = field(default_factory=dict)  # canonical name -> provider
    records: list[PluginRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Running:
    """The entry point whose code runs now, and the threads that were alive before it started."""

    record: PluginRecord
    threads: frozenset[threading.Thread]


def env_flag(name: str) -> bool:
    """Whether environment switch ``name`` is on (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_switches() -> dict[str, str | None]:
    """The plugin-loading environment switches and their current values."""
    return {k: os.environ.get(k) for k in (ENV_DISABLE, ENV_ALLOW, ENV_STRICT)}


def allow_list() -> dict[str, str] | None:
    """``ATTNREG_PLUGINS`` as {normalised name: name as written}; None when unset."""
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {normalize_name(a): a.strip() for a in raw.split(",") if a.strip()}


def dist_name(ep: EntryPoint) -> str | None:
    """Name of the distribution that declares ``ep`` (None if unknown)."""
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def dist_label(ep: EntryPoint) -> str:
    """``name version`` of the distribution that declares ``ep``."""
    dist = getattr(ep, "dist", None)
    return "<unknown distribution>" if dist is None else f"{dist.metadata['Name']} {dist.version}"


def is_builtin(ep: EntryPoint) -> bool:
    """Whether ``ep`` is one of attnreg's own (built-in) plugins."""
    return dist_name(ep) == BUILTIN_DIST
