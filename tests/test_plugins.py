"""Plugin loading: isolation per entry point, env switches, strict mode, runtime register()."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
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
        def _load_one(self, ep, record, strict):  # type: ignore[no-untyped-def]
            time.sleep(0.05)
            super()._load_one(ep, record, strict)

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


def test_unregister_removes_the_runtime_record() -> None:
    spec = DOT_SPEC.__class__(**{**DOT_SPEC.__dict__, "name": "dp_copy", "aliases": (),
                                 "config": _copy_config("dp_copy")})
    attnreg.register(spec, name="copy")
    assert [r.status for r in attnreg.plugin_records() if r.name == "copy"] == ["loaded"]
    attnreg.unregister("dp_copy")
    assert not [r for r in attnreg.plugin_records() if r.name == "copy"]


def _copy_config(name: str):  # type: ignore[no-untyped-def]
    from typing import Literal

    from attnreg.plugins.dot_product import DotProductConfig

    return type("CopyConfig", (DotProductConfig,), {"__annotations__": {"variant": Literal[name]},
                                                    "variant": name})


def test_specs_are_hashable() -> None:
    specs = {attnreg.get_variant(n) for n in attnreg.list_variants()}
    assert len(specs) == len(attnreg.list_variants())


# -- exits, interrupts, threads, names, cycles (issue 15) -------------------------------------
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A new registry that is also ``attnreg``'s (plugin code calling ``attnreg.*`` reaches it)."""
    from attnreg import _plugins

    reg = Registry()
    monkeypatch.setattr(_plugins, "REGISTRY", reg)
    monkeypatch.setattr(attnreg, "REGISTRY", reg, raising=False)  # undone with the line above
    return reg


def test_a_caught_exit_leaves_no_half_loaded_registry(plugin_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    exit_code = "import sys\nsys.exit(4)\n"
    make_dist(plugin_dir, "attnreg-exit", "exit_first", "attnreg_test_exit_first", exit_code)
    reg = _fresh(monkeypatch)
    try:
        names = [s.name for s in reg.specs()]
    except SystemExit:  # what a notebook would catch
        names = []
    assert "good_variant" in names  # sorted after exit_first: loading went on
    assert "sys.exit(4)" in next(r for r in reg.records() if r.name == "exit_first").error


def test_keyboard_interrupt_propagates_and_the_next_use_loads_again(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = plugin_dir / "interrupted"
    code = (f"import pathlib\nflag = pathlib.Path({str(flag)!r})\n"
            "if not flag.exists():\n    flag.touch()\n    raise KeyboardInterrupt\n"
            + GOOD_PLUGIN.format(name="after_interrupt", aliases=()))
    make_dist(plugin_dir, "attnreg-interrupt", "aa_interrupt", "attnreg_test_interrupt", code)
    reg = _fresh(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        reg.specs()
    assert not reg._loaded and not reg._state.records and not reg._pm.get_plugins()
    names = [s.name for s in reg.specs()]  # a full load, not what was left of the first one
    assert {"dot_product", "after_interrupt", "good_variant"} <= set(names)
    assert [r.name for r in reg.records()].count("dot_product") == 1


def test_plugin_code_on_the_loading_thread_sees_the_registry_so_far(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = ("import attnreg\nSEEN = attnreg.list_variants()\n"
            + GOOD_PLUGIN.format(name="reentrant_variant", aliases=()))
    make_dist(plugin_dir, "attnreg-reentrant", "a_reentrant", "attnreg_test_reentrant", code)  # before "good"
    monkeypatch.setenv("ATTNREG_PLUGINS", "a_reentrant,good")
    reg = _fresh(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a misbehaviour: no warning
        names = [s.name for s in reg.specs()]
    assert "reentrant_variant" in names
    seen = sys.modules["attnreg_test_reentrant"].SEEN
    assert "dot_product" in seen and "reentrant_variant" not in seen and "good_variant" not in seen
    assert next(r for r in reg.records() if r.name == "a_reentrant").warnings == ()


def test_first_use_from_many_threads_loads_once(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    loads: list[int] = []

    class SlowRegistry(Registry):
        def _load_entry_points(self) -> None:
            loads.append(threading.get_ident())
            super()._load_entry_points()

        def _load_one(self, ep, record, strict):  # type: ignore[no-untyped-def]
            time.sleep(0.01)  # widen the window in which the other threads arrive
            super()._load_one(ep, record, strict)

    reg = SlowRegistry()
    barrier = threading.Barrier(8)
    results: list[object] = [None] * 8

    def use(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ([s.name for s in reg.specs()], reg.resolve("goodie"))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            results[i] = exc

    threads = [threading.Thread(target=use, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(loads) == 1
    assert all(r == results[0] for r in results), results
    names, resolved = results[0]  # type: ignore[misc]
    assert "good_variant" in names and resolved == "good_variant"


@pytest.mark.parametrize("written",
                         ["GOOD", "Attnreg_Good", "attnreg.good", "attnreg--good", " attnreg-good "])
def test_allow_list_names_are_compared_as_pip_does(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    monkeypatch.setenv("ATTNREG_PLUGINS", written)
    reg = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "good_variant" in [s.name for s in reg.specs()]
    assert reg.unmatched_allow_list() == ()


def test_allow_list_names_matching_nothing_are_reported(plugin_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREG_PLUGINS", "good,attnreg-godo,nothing_here")
    reg = Registry()
    with pytest.warns(attnreg.PluginWarning, match="ATTNREG_PLUGINS names no installed attnreg plugin: "
                                           "attnreg-godo, nothing_here"):
        assert "good_variant" in [s.name for s in reg.specs()]
    assert reg.unmatched_allow_list() == ("attnreg-godo", "nothing_here")
    env = {**os.environ, "PYTHONPATH": str(plugin_dir), "COLUMNS": "250", "ATTNREG_PLUGINS": "good,godo"}
    doctor = subprocess.run([sys.executable, "-m", "attnreg", "doctor"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0 and "ATTNREG_PLUGINS names no installed plugin: godo" in doctor.stdout
    monkeypatch.setenv("ATTNREG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="names no installed attnreg plugin: attnreg-godo"):
        Registry().specs()


def test_register_unregister_cycles_leave_nothing_behind() -> None:
    import types

    mod = types.ModuleType("attnreg_cycle_plugin")
    code = GOOD_PLUGIN.format(name="cycle_variant", aliases=("cycle_alias",))
    exec(compile(code, "<cycle plugin>", "exec", dont_inherit=True), mod.__dict__)
    spec = mod.attnreg_variants()[0]
    reg = attnreg.REGISTRY

    def footprint() -> tuple[int, ...]:
        s = reg._state
        return len(s.records), len(s.specs), len(s.names), len(s.providers), len(reg._pm.get_plugins())

    attnreg.list_variants()
    before = footprint()
    for i in range(20):
        plugin = (mod, spec, [spec])[i % 3]
        assert [s.name for s in attnreg.register(plugin, name=f"cycle{i}")] == ["cycle_variant"]
        assert footprint() != before
        attnreg.unregister("cycle_alias")
        assert footprint() == before, i
    with pytest.raises(attnreg.DuplicateVariantError):  # a failed register leaves nothing either
        attnreg.register(DOT_SPEC, name="dup")
    assert footprint() == before


def test_register_turns_a_plugin_exit_into_an_error() -> None:
    import types

    mod = types.ModuleType("attnreg_exit_plugin")
    code = "from attnreg.core import hookimpl\n@hookimpl\ndef attnreg_variants():\n    raise SystemExit(5)\n"
    exec(compile(code, "<exit plugin>", "exec", dont_inherit=True), mod.__dict__)
    before = len(attnreg.plugin_records()), len(attnreg.REGISTRY._pm.get_plugins())
    with pytest.raises(PluginLoadError, match=r"register\(exiter\) failed: SystemExit: .*sys.exit\(5\)"):
        attnreg.register(mod, name="exiter")
    assert (len(attnreg.plugin_records()), len(attnreg.REGISTRY._pm.get_plugins())) == before
