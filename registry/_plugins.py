"""The plugin manager: lazy, thread-safe, isolated per entry point.

pluggy's ``load_setuptools_entrypoints`` stops at the first broken plugin; here each entry
point is imported, registered and asked for its variants on its own, and a failure (any
exception but ``KeyboardInterrupt``, ``sys.exit`` included) is recorded with the distribution
that shipped it instead of taking the registry, or the process, down. Plugin code never runs
under the registry's lock, and whatever it changes in torch's global state is put back and
reported (``_isolation.py``).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import pluggy

from attnreg.core import DuplicateVariantError, PluginLoadError, VariantSpec

from ._errors import PluginWarning, unknown_variant
from ._hookspec import PROJECT_NAME, AttnregHookSpecs
from ._isolation import TorchStateGuard, describe_exception, normalize_name
from ._plugin_env import (
    BUILTIN_DIST,
    ENTRY_POINT_GROUP,
    ENV_ALLOW,
    ENV_DISABLE,
    ENV_STRICT,
    PluginRecord,
    Running,
    State,
    allow_list,
    dist_label,
    dist_name,
    env_flag,
    env_switches,
    is_builtin,
)

__all__ = ["BUILTIN_DIST", "ENTRY_POINT_GROUP", "ENV_ALLOW", "ENV_DISABLE", "ENV_STRICT", "REGISTRY",
           "PluginRecord", "Registry", "env_switches"]

T = TypeVar("T")


def _warn(message: str) -> None:
    """A ``PluginWarning`` attributed to the first caller outside attnreg (loading is lazy: that
    is the user's line that first used the registry)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is _warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "attnreg":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PluginWarning, stacklevel=level)


class Registry:
    """Holds every registered variant. Use the module-level functions of ``attnreg``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # guards the state below; never held while plugin code runs
        self._changed = threading.Condition(self._lock)  # notified when loading ends or is abandoned
        self._loaded = False  # True only once loading has finished
        self._loader: threading.Thread | None = None  # the thread loading entry points now
        self._running: Running | None = None
        self._strict_error: PluginLoadError | None = None
        self._unmatched: tuple[str, ...] = ()  # ATTNREG_PLUGINS names that matched no plugin
        self._reset()

    def _reset(self) -> None:
        self._state = State()
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(AttnregHookSpecs)

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load entry points on first use, once; every thread gets the same, complete registry.

        Other threads wait until loading has finished. Plugin code on the loading thread (an
        import or hook calling back into attnreg) sees the registry as loaded so far instead of
        recursing. A thread started by a plugin while its code runs gets a ``PluginLoadError``
        naming the plugin instead of waiting (waiting would deadlock a plugin that joins it).
        """
        if not self._loaded and self._claim_loading():
            self._run_loading()
        if self._strict_error is not None:  # strict mode: every later use fails the same way
            raise self._strict_error

    def _claim_loading(self) -> bool:
        """True if this thread must load now; otherwise return once loading has finished (at
        once for plugin code on the loading thread)."""
        me = threading.current_thread()
        with self._changed:
            while not self._loaded:
                if self._loader is None:
                    self._loader = me
                    return True
                if self._loader is me:
                    return False
                running = self._running
                if running is not None and me not in running.threads:
                    raise self._reentry_error(running)
                self._changed.wait()
        return False

    def _run_loading(self) -> None:
        strict_error: PluginLoadError | None = None
        try:
            self._load_entry_points()
        except PluginLoadError as exc:
            strict_error = exc
        except BaseException:  # KeyboardInterrupt: keep nothing half-loaded; the next use loads again
            with self._changed:
                self._reset()
                self._loader = self._running = None
                self._changed.notify_all()
            raise
        with self._changed:
            self._strict_error = strict_error
            self._loaded = True
            self._loader = self._running = None
            self._changed.notify_all()

    def _reentry_error(self, running: Running) -> PluginLoadError:
        record = running.record
        note = ("started a thread that used attnreg while the plugin was loading (the call "
                "raised PluginLoadError instead of deadlocking)")
        if note not in record.warnings:
            record.warnings += (note,)
        return PluginLoadError(
            f"attnreg was used from a thread started while plugin '{record.name}' from "
            f"{record.provider} ({record.target}) was loading. The registry is incomplete until "
            "that plugin's import and hook return, and waiting for them here would deadlock a "
            "plugin that joins this thread: use attnreg after the import returns, not from "
            "threads started during it."
        )

    def _load_entry_points(self) -> None:
        disabled = env_flag(ENV_DISABLE)
        allow = allow_list()
        strict = env_flag(ENV_STRICT)
        matched: set[str] = set()
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not is_builtin(e), e.name))
        for ep in eps:
            record = PluginRecord(ep.name, dist_label(ep), ep.value)
            dist = dist_name(ep)
            keys = {normalize_name(ep.name)} | ({normalize_name(dist)} if dist else set())
            listed = allow is not None and bool(keys & allow.keys())
            matched |= keys if listed else set()
            if not is_builtin(ep) and (disabled or (allow is not None and not listed)):
                record.status = "filtered"
                record.error = f"not loaded: {ENV_DISABLE}=1" if disabled else f"not in {ENV_ALLOW}"
                with self._lock:
                    self._state.records.append(record)
                continue
            self._load_one(ep, record, strict)
        unmatched = tuple(raw for norm, raw in (allow or {}).items() if norm not in matched)
        with self._lock:
            self._unmatched = unmatched
        if unmatched:
            message = (f"{ENV_ALLOW} names no installed attnreg plugin: {', '.join(unmatched)} (names "
                       "are entry-point or distribution names, compared as pip does; `attnreg "
                       "doctor` lists what is installed)")
            if strict:
                raise PluginLoadError(f"{message}. Unset {ENV_STRICT} to only warn.")
            _warn(message)

    def _load_one(self, ep: EntryPoint, record: PluginRecord, strict: bool) -> None:
        """Import one entry point and register what its hook returns; any failure, exit or
        change of torch's global state is recorded against it (and raised in strict mode)."""
        guard = TorchStateGuard()
        with self._lock:
            self._running = Running(record, frozenset(threading.enumerate()))
        error: str | None = None
        cause: BaseException | None = None
        specs: list[VariantSpec] = []
        registered: Any = None
        try:
            try:
                obj = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - isolation is the point (SystemExit too)
                error, cause = f"import of {ep.value!r} failed: {describe_exception(exc)}", exc
            else:
                try:
                    specs, registered = self._collect(obj, record)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - isolation is the point
                    error, cause = describe_exception(exc), exc
        finally:
            with self._lock:
                self._running = None
            changes = guard.restore()
        if changes:
            record.warnings += (f"changed torch's global state while loading: {'; '.join(changes)}",)
        if error is None:
            try:
                self._commit(specs, record, registered)
            except DuplicateVariantError as exc:
                error, cause = describe_exception(exc), exc
        if error is not None:
            record.status, record.error = "failed", error
            with self._lock:
                self._state.records.append(record)
        self._report(record, cause, strict)

    def _report(self, record: PluginRecord, cause: BaseException | None, strict: bool) -> None:
        """Strict mode: any failure or warning of ``record`` is an error. Otherwise warnings are
        Python warnings (failures are shown by ``attnreg doctor`` / ``attnreg list``)."""
        failed = record.status == "failed" and record.error is not None
        problems = ([record.error] if failed else []) + list(record.warnings)
        if strict and problems:
            what = "failed to load" if record.status == "failed" else "misbehaved while loading"
            raise PluginLoadError(
                f"plugin '{record.name}' from {record.provider} {what}:\n  " + "\n  ".join(problems)
                + f"\nUnset {ENV_STRICT} to skip broken plugins, or fix/uninstall that distribution."
            ) from cause
        for note in record.warnings:
            _warn(f"attnreg plugin '{record.name}' from {record.provider} {note}")

    def _collect(self, obj: Any, record: PluginRecord) -> tuple[list[VariantSpec], Any]:
        """The specs ``obj`` provides (a spec, a list of specs, or an object with the hook) and
        the object registered with pluggy for it (None for specs). Runs the plugin's hook, so it
        is never called under the lock; on any error nothing of ``obj`` stays registered."""
        if isinstance(obj, VariantSpec):
            return [obj], None
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(s, VariantSpec) for s in obj):
            return list(obj), None
        registered = None
        try:
            with self._lock:  # pluggy's manager is not thread-safe
                if not self._pm.is_registered(obj):  # the same object again fails on its names later
                    self._pm.register(obj, name=f"{record.name}@{id(obj)}")
                    registered = obj
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
            return list(result), registered
        except BaseException:
            self._forget(registered)
            raise

    def _forget(self, plugin: Any) -> None:
        if plugin is not None:
            with self._lock:
                if self._pm.is_registered(plugin):
                    self._pm.unregister(plugin)

    def _commit(self, specs: list[VariantSpec], record: PluginRecord, registered: Any) -> None:
        """Add ``specs`` and ``record`` atomically; a taken name adds nothing and raises."""
        with self._lock:
            try:
                self._check_names(specs, record)
            except BaseException:
                self._forget(registered)
                raise
            for spec in specs:
                self._state.specs[spec.name] = spec
                self._state.providers[spec.name] = record.provider
                for n in spec.names:
                    self._state.names[n] = spec.name
            record.status = "loaded"
            record.variants = tuple(s.name for s in specs)
            record.plugin = registered
            self._state.records.append(record)

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
        record = PluginRecord(str(label), "runtime", f"register({label})")
        try:
            specs, registered = self._collect(plugin, record)
        except (DuplicateVariantError, PluginLoadError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - a plugin's sys.exit must not exit
            raise PluginLoadError(f"{record.target} failed: {describe_exception(exc)}") from exc
        self._commit(specs, record, registered)
        return specs

    def unregister(self, name: str) -> None:
        """Remove a variant (by name or alias) and all its aliases. A runtime registration
        whose last variant goes leaves no record behind; an entry point's record says
        ``unregistered``."""
        self.ensure_loaded()
        with self._lock:
            canonical = self._resolve(name)
            spec = self._state.specs.pop(canonical)
            self._state.providers.pop(canonical)
            for n in spec.names:
                self._state.names.pop(n, None)
            for record in list(self._state.records):
                if canonical not in record.variants:
                    continue
                record.variants = tuple(v for v in record.variants if v != canonical)
                if record.variants:
                    continue
                self._forget(record.plugin)
                record.plugin = None
                if record.provider == "runtime":
                    self._state.records.remove(record)
                else:
                    record.status = "unregistered"

    def _resolve(self, name: str) -> str:
        canonical = self._state.names.get(name) if isinstance(name, str) else None
        if canonical is None:
            raise unknown_variant(name, sorted(self._state.names), self._state.records)
        return canonical

    def _when_loaded(self, read: Callable[[State], T]) -> T:
        """``read(state)`` once every plugin is loaded, under the lock."""
        self.ensure_loaded()
        with self._lock:
            return read(self._state)

    def resolve(self, name: str) -> str:
        """Canonical name of a variant name or alias; ``UnknownVariantError`` otherwise."""
        return self._when_loaded(lambda _: self._resolve(name))

    def get(self, name: str) -> VariantSpec:
        """The spec of a variant name or alias."""
        return self._when_loaded(lambda st: st.specs[self._resolve(name)])

    def specs(self) -> list[VariantSpec]:
        """All registered specs, sorted by name."""
        return self._when_loaded(lambda st: [st.specs[k] for k in sorted(st.specs)])

    def provider(self, name: str) -> str:
        """Distribution (and version) that provided a variant."""
        return self._when_loaded(lambda st: st.providers[self._resolve(name)])

    def records(self) -> list[PluginRecord]:
        """One record per plugin seen: loaded, failed, filtered or unregistered."""
        return self._when_loaded(lambda st: list(st.records))

    def unmatched_allow_list(self) -> tuple[str, ...]:
        """Names in ``ATTNREG_PLUGINS`` that matched no entry point or distribution at loading."""
        return self._when_loaded(lambda _: self._unmatched)

    def loading_report(self) -> tuple[list[PluginRecord], tuple[str, ...]]:
        """``records()`` and ``unmatched_allow_list()`` as they stand, without loading: what a
        failed (strict) loading got to, for ``attnreg doctor``."""
        with self._lock:
            return list(self._state.records), self._unmatched


REGISTRY = Registry()
