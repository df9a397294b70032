"""The plugin manager: lazy, thread-safe, isolated per entry point.

pluggy's ``load_setuptools_entrypoints`` stops at the first broken plugin; here each entry
point is imported, registered and asked for its variants on its own, and a failure is recorded
(with the distribution that shipped it) instead of taking the registry down.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from attnreg.core import (
    PROJECT_NAME,
    AttnregHookSpecs,
    DuplicateVariantError,
    PluginLoadError,
    VariantSpec,
)

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


@dataclass
class _State:
    specs: dict[str, VariantSpec] = field(default_factory=dict)  # canonical name -> spec
    names: dict[str, str] = field(default_factory=dict)  # name or alias -> canonical name
    providers: dict[str, str] = field(default_factory=dict)  # canonical name -> provider
    records: list[PluginRecord] = field(default_factory=list)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_switches() -> dict[str, str | None]:
    """The plugin-loading environment switches and their current values."""
    return {k: os.environ.get(k) for k in (ENV_DISABLE, ENV_ALLOW, ENV_STRICT)}


def _dist_label(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown distribution>"
    return f"{dist.metadata['Name']} {dist.version}"


def _is_builtin(ep: EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.metadata["Name"] == BUILTIN_DIST


class Registry:
    """Holds every registered variant. Use the module-level functions of ``attnreg``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False  # True only once loading has finished
        self._loading = False  # True while this registry's entry points are being imported
        self._strict_error: PluginLoadError | None = None
        self._state = _State()
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(AttnregHookSpecs)

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load entry points on first use, once. Other threads wait on the lock until loading has
        finished; only a plugin calling back into attnreg from its own import (same thread,
        re-entrant lock) sees the partly filled registry instead of recursing."""
        if not self._loaded:
            with self._lock:
                if not self._loaded and not self._loading:
                    self._loading = True
                    try:
                        self._load_entry_points()
                    except PluginLoadError as exc:
                        self._strict_error = exc
                    finally:
                        self._loading = False
                        self._loaded = True
        if self._strict_error is not None:  # strict mode: every later use fails the same way
            raise self._strict_error

    def _load_entry_points(self) -> None:
        disabled = _env_flag(ENV_DISABLE)
        allow_raw = os.environ.get(ENV_ALLOW)
        allow = None if allow_raw is None else {a.strip() for a in allow_raw.split(",") if a.strip()}
        strict = _env_flag(ENV_STRICT)
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not _is_builtin(e), e.name))
        for ep in eps:
            record = PluginRecord(ep.name, _dist_label(ep), ep.value)
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            if not _is_builtin(ep) and (
                disabled or (allow is not None and ep.name not in allow and dist_name not in allow)
            ):
                record.status = "filtered"
                record.error = f"not loaded: {ENV_DISABLE}=1" if disabled else f"not in {ENV_ALLOW}"
                self._state.records.append(record)
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                self._fail(record, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}", exc, strict)
                continue
            self._add_entry_point(obj, record, strict)

    def _fail(self, record: PluginRecord, message: str, exc: BaseException | None, strict: bool) -> None:
        record.status = "failed"
        record.error = message
        self._state.records.append(record)
        if strict:
            raise PluginLoadError(
                f"plugin '{record.name}' from {record.provider} failed to load:\n  {message}\n"
                f"Unset {ENV_STRICT} to skip broken plugins, or fix/uninstall that distribution."
            ) from exc

    def _add_entry_point(self, obj: Any, record: PluginRecord, strict: bool) -> None:
        try:
            self._add_plugin(obj, record)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            self._fail(record, f"{type(exc).__name__}: {exc}", exc, strict)

    def _add_plugin(self, obj: Any, record: PluginRecord) -> list[VariantSpec]:
        """Register ``obj`` (module/object with the hook, a spec or a list of specs) atomically:
        on any error nothing of it stays registered and the error propagates."""
        registered: list[Any] = []
        try:
            specs = self._collect(obj, record, registered)
            self._check_names(specs, record)
        except BaseException:
            for plugin in registered:
                self._pm.unregister(plugin)
            raise
        for spec in specs:
            self._state.specs[spec.name] = spec
            self._state.providers[spec.name] = record.provider
            for n in spec.names:
                self._state.names[n] = spec.name
        record.status = "loaded"
        record.variants = tuple(s.name for s in specs)
        self._state.records.append(record)
        return specs

    def _collect(self, obj: Any, record: PluginRecord, registered: list[Any]) -> list[VariantSpec]:
        if isinstance(obj, VariantSpec):
            return [obj]
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(s, VariantSpec) for s in obj):
            return list(obj)
        name = f"{record.name}@{id(obj)}"
        if not self._pm.is_registered(obj):  # the same object again fails on its names below
            self._pm.register(obj, name=name)
            registered.append(obj)
        impls = [i for i in self._pm.hook.attnreg_variants.get_hookimpls() if i.plugin is obj]
        if not impls:
            raise PluginLoadError(
                f"{record.target} defines no @attnreg.hookimpl function 'attnreg_variants'"
            )
        result = impls[0].function()
        if not isinstance(result, (list, tuple)):
            raise PluginLoadError(
                f"attnreg_variants() must return a list of VariantSpec, got {type(result).__name__}"
            )
        bad = [r for r in result if not isinstance(r, VariantSpec)]
        if bad:
            raise PluginLoadError(
                f"attnreg_variants() returned {type(bad[0]).__name__} {bad[0]!r}; "
                "every item must be an attnreg.VariantSpec"
            )
        if not result:
            raise PluginLoadError("attnreg_variants() returned no variants")
        return list(result)

    def _check_names(self, specs: Iterable[VariantSpec], record: PluginRecord) -> None:
        seen: dict[str, str] = {}
        for spec in specs:
            for n in spec.names:
                taken = self._state.names.get(n)
                if taken is not None:
                    raise DuplicateVariantError(
                        f"variant name '{n}' from {record.provider} ({record.target}) is already "
                        f"taken by variant '{taken}' from {self._state.providers[taken]}; "
                        "choose another name or alias (attnreg never overwrites silently)"
                    )
                if n in seen:
                    raise DuplicateVariantError(
                        f"variant name '{n}' is declared twice by {record.provider} "
                        f"({seen[n]} and {spec.name})"
                    )
                seen[n] = spec.name

    # -- runtime API -----------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> list[VariantSpec]:
        """Register a plugin object/module, a ``VariantSpec`` or a list of specs at runtime."""
        self.ensure_loaded()
        label = name or getattr(plugin, "name", None) or getattr(plugin, "__name__", None)
        label = label or type(plugin).__name__
        with self._lock:
            record = PluginRecord(str(label), "runtime", f"register({label})")
            try:
                return self._add_plugin(plugin, record)
            except (DuplicateVariantError, PluginLoadError):
                raise
            except Exception as exc:
                raise PluginLoadError(
                    f"register({record.target}) failed: {type(exc).__name__}: {exc}"
                ) from exc

    def unregister(self, name: str) -> None:
        """Remove a variant (by name or alias) and all its aliases."""
        with self._lock:
            canonical = self.resolve(name)
            spec = self._state.specs.pop(canonical)
            self._state.providers.pop(canonical)
            for n in spec.names:
                self._state.names.pop(n, None)
            for record in self._state.records:
                if canonical in record.variants:
                    record.variants = tuple(v for v in record.variants if v != canonical)
                    record.status = record.status if record.variants else "unregistered"

    def resolve(self, name: str) -> str:
        """Canonical name of a variant name or alias; ``UnknownVariantError`` otherwise."""
        from ._errors import unknown_variant

        self.ensure_loaded()
        with self._lock:
            canonical = self._state.names.get(name) if isinstance(name, str) else None
        if canonical is None:
            raise unknown_variant(name, sorted(self._state.names))
        return canonical

    def get(self, name: str) -> VariantSpec:
        """The spec of a variant name or alias."""
        with self._lock:
            return self._state.specs[self.resolve(name)]

    def specs(self) -> list[VariantSpec]:
        """All registered specs, sorted by name."""
        self.ensure_loaded()
        with self._lock:
            return [self._state.specs[k] for k in sorted(self._state.specs)]

    def provider(self, name: str) -> str:
        """Distribution (and version) that provided a variant."""
        with self._lock:
            return self._state.providers[self.resolve(name)]

    def records(self) -> list[PluginRecord]:
        """One record per plugin seen: loaded, failed or filtered."""
        self.ensure_loaded()
        with self._lock:
            return list(self._state.records)


REGISTRY = Registry()
