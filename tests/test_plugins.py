"""Plugin loading: isolation per entry point, env switches, strict mode, runtime register()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_fixtures import BROKEN_PLUGINS, GOOD_PLUGIN, make_dist

import attnreg
from attnreg._plugins import Registry
from attnreg.core import PluginLoadError
from attnreg.plugins.dot_product import SPEC as DOT_SPEC


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Five broken distributions and one good one, importable and discoverable."""
    for kind, code in BROKEN_PLUGINS.items():
        make_dist(tmp_path, f"attnreg-bad-{kind.replace('_', '-')}", kind, f"attnreg_test_{kind}", code)
    make_dist(tmp_path, "attnreg-good", "good", "attnreg_test_good",
              GOOD_PLUGIN.format(name="good_variant", aliases=("goodie",)))
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("ATTNREG_DISABLE_PLUGIN_AUTOLOAD", "ATTNREG_PLUGINS", "ATTNREG_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("attnreg_test_")]:
        del sys.modules[mod]


def test_each_broken_plugin_is_skipped_and_recorded(plugin_dir: Path) -> None:
    reg = Registry()
    names = [s.name for s in reg.specs()]
    assert "dot_product" in names and "good_variant" in names
    assert reg.get("goodie").name == "good_variant"
    records = {r.name: r for r in reg.records()}
    expected = {
        "import_error": "boom at import",
        "hook_raises": "boom in hook",
        "bad_return": "every item must be an attnreg.VariantSpec",
        "name_clash": "'dot_product' from attnreg-bad-name-clash 1.0",
        "alias_clash": "'sdpa' from attnreg-bad-alias-clash 1.0",
    }
    for entry, text in expected.items():
        rec = records[entry]
        assert rec.status == "failed", entry
        assert text in rec.error, (entry, rec.error)
        assert rec.provider == f"attnreg-bad-{entry.replace('_', '-')} 1.0"
    # a failed plugin leaves nothing behind: the alias clash's own name is not registered
    assert "clash_variant" not in names
    assert reg.get("sdpa").name == "dot_product"


@pytest.mark.parametrize("entry", sorted(BROKEN_PLUGINS))
def test_strict_mode_turns_each_failure_into_an_error(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.setenv("ATTNREG_STRICT_PLUGINS", "1")
    monkeypatch.setenv("ATTNREG_PLUGINS", entry)  # only this broken one (built-ins always load)
    reg = Registry()
    with pytest.raises(PluginLoadError, match=f"plugin '{entry}' from attnreg-bad-"):
        reg.specs()
    with pytest.raises(PluginLoadError):  # and it stays an error, not a half-loaded registry
        reg.get("dot_product")


def test_allow_list_filters_before_import(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREG_PLUGINS", "good")
    reg = Registry()
    assert {"dot_product", "good_variant"} <= set(s.name for s in reg.specs())
    for kind in BROKEN_PLUGINS:
        assert f"attnreg_test_{kind}" not in sys.modules
    statuses = {r.name: r.status for r in reg.records()}
    assert statuses["import_error"] == "filtered" and statuses["good"] == "loaded"


def test_allow_list_accepts_distribution_names(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREG_PLUGINS", "attnreg-good")
    assert "good_variant" in [s.name for s in Registry().specs()]


def test_disable_autoload_keeps_only_builtins(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREG_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert "good_variant" not in [s.name for s in reg.specs()]
    assert "dot_product" in [s.name for s in reg.specs()]
    assert "attnreg_test_good" not in sys.modules
    assert all(r.provider.startswith("attnreg ") for r in reg.records() if r.status == "loaded")


def test_doctor_reports_failed_plugins_with_distribution(plugin_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(plugin_dir), "COLUMNS": "250"}
    env.pop("ATTNREG_STRICT_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "attnreg", "doctor"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for entry in BROKEN_PLUGINS:
        assert f"attnreg-bad-{entry.replace('_', '-')} 1.0" in proc.stdout
    assert "boom at import" in proc.stdout and "boom in hook" in proc.stdout
    assert "5 failed" in proc.stdout
    strict = subprocess.run([sys.executable, "-m", "attnreg", "doctor"],
                            env={**env, "ATTNREG_STRICT_PLUGINS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "strict plugin loading failed" in strict.stdout


def test_runtime_register_and_duplicates() -> None:
    import types

    code = GOOD_PLUGIN.format(name="runtime_variant", aliases=("rt_alias",))
    mod = types.ModuleType("attnreg_runtime_plugin")
    exec(compile(code, "<runtime plugin>", "exec", dont_inherit=True), mod.__dict__)
    try:
        specs = attnreg.register(mod)
        assert [s.name for s in specs] == ["runtime_variant"]
        assert "runtime_variant" in attnreg.list_variants()
        assert attnreg.get_variant("rt_alias").name == "runtime_variant"
        with pytest.raises(attnreg.DuplicateVariantError, match="runtime.*already taken.*runtime"):
            attnreg.register(mod)
        taken = r"'dot_product' from runtime \(register\(again\)\) is already taken.*from attnreg 0\.1\.0"
        with pytest.raises(attnreg.DuplicateVariantError, match=taken):
            attnreg.register(DOT_SPEC, name="again")
        module = attnreg.build("rt_alias")
        assert module.variant == "runtime_variant"
    finally:
        attnreg.unregister("runtime_variant")
    assert "runtime_variant" not in attnreg.list_variants()
    with pytest.raises(attnreg.UnknownVariantError):
        attnreg.get_variant("rt_alias")


def test_register_rejects_objects_without_hook() -> None:
    with pytest.raises(PluginLoadError, match="defines no @attnreg.hookimpl"):
        attnreg.register(object(), name="nothing")


def test_spec_validation_errors_are_clear() -> None:
    from attnreg.plugins.dot_product import DotProductAttention, DotProductConfig

    kwargs = dict(config=DotProductConfig, factory=DotProductAttention,
                  capabilities=DotProductAttention.capabilities, summary="s", reference="r")
    with pytest.raises(TypeError, match=r"variant must be declared as Literal\['other'\]"):
        attnreg.VariantSpec(name="other", **kwargs)
    with pytest.raises(ValueError, match="name must match"):
        attnreg.VariantSpec(name="Bad Name", **kwargs)
    with pytest.raises(ValueError, match="needs a non-empty reason"):
        attnreg.VariantSpec(name="dot_product", expected_failures={"check": ""}, **kwargs)


def test_concurrent_first_use_waits_for_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second thread must never see a half-filled registry while the first one loads."""
    import threading
    import time

    class SlowRegistry(Registry):
        def _add_entry_point(self, obj, record, strict):  # type: ignore[no-untyped-def]
            time.sleep(0.05)
            super()._add_entry_point(obj, record, strict)

    reg = SlowRegistry()
    results: dict[str, object] = {}
    loader = threading.Thread(target=lambda: results.setdefault("a", reg.specs()))
    loader.start()
    time.sleep(0.01)  # the loader now holds the lock and is importing
    try:
        results["b"] = reg.resolve("sdpa")
    except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
        results["b"] = exc
    loader.join()
    assert results["b"] == "dot_product"


def test_unregister_updates_the_record() -> None:
    attnreg.register(DOT_SPEC.__class__(**{**DOT_SPEC.__dict__, "name": "dp_copy", "aliases": (),
                                          "config": _copy_config("dp_copy")}), name="copy")
    attnreg.unregister("dp_copy")
    record = [r for r in attnreg.plugin_records() if r.name == "copy"][-1]
    assert record.status == "unregistered" and record.variants == ()


def _copy_config(name: str):  # type: ignore[no-untyped-def]
    from typing import Literal

    from attnreg.plugins.dot_product import DotProductConfig

    return type("CopyConfig", (DotProductConfig,), {"__annotations__": {"variant": Literal[name]},
                                                    "variant": name})


def test_specs_are_hashable() -> None:
    specs = {attnreg.get_variant(n) for n in attnreg.list_variants()}
    assert len(specs) == len(attnreg.list_variants())
