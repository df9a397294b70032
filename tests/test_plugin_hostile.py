"""The hostile-plugin matrix: every breakage a plugin can bring, each a throwaway distribution with
an entry point. Each must be isolated (recorded against its plugin, the rest loads, the process
and torch's global state survive), named by ``attnreg doctor`` and ``attnreg list``, and an error
under ``ATTNREG_STRICT_PLUGINS=1``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from plugin_fixtures import GOOD_PLUGIN, HOSTILE_PLUGINS, hostile_dist, make_dist, make_hostile_dists

import attnreg
from attnreg._plugins import Registry
from attnreg.core import PluginLoadError

ENV = ("ATTNREG_DISABLE_PLUGIN_AUTOLOAD", "ATTNREG_PLUGINS", "ATTNREG_STRICT_PLUGINS")


def _torch_state() -> tuple[object, ...]:
    return (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(),
            torch.initial_seed(), torch.get_rng_state())


@pytest.fixture
def hostile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every hostile distribution and one good one, importable and discoverable; torch's global
    state is put back by hand afterwards, so a regression cannot leak into other tests."""
    make_hostile_dists(tmp_path)
    make_dist(tmp_path, "attnreg-good", "good", "attnreg_test_good",
              GOOD_PLUGIN.format(name="good_variant", aliases=("goodie",)))
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    threads, dtype, grad, _, rng = _torch_state()
    yield tmp_path
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_rng_state(rng)
    for mod in [m for m in sys.modules if m.startswith("attnreg_test_")]:
        del sys.modules[mod]


def _fresh(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A new registry that is also ``attnreg``'s (plugins calling ``attnreg.*`` reach it)."""
    from attnreg import _plugins

    reg = Registry()
    monkeypatch.setattr(_plugins, "REGISTRY", reg)
    monkeypatch.setattr(attnreg, "REGISTRY", reg, raising=False)  # undone with the line above
    return reg


def _assert_same_state(before: tuple[object, ...]) -> None:
    after = _torch_state()
    assert after[:4] == before[:4], "torch's global state leaked out of plugin loading"
    assert torch.equal(after[4], before[4]), "the global RNG state leaked out of plugin loading"  # type: ignore[arg-type]


def test_every_hostile_plugin_is_isolated_in_one_load(hostile_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = _torch_state()
    reg = _fresh(monkeypatch)
    with pytest.warns(attnreg.PluginWarning) as caught:
        names = [s.name for s in reg.specs()]  # returns: no exit, no deadlock, no exception
    _assert_same_state(before)
    warned = {e for e, h in HOSTILE_PLUGINS.items() if h.status == "loaded"}
    assert {e for e in warned if any(f"plugin '{e}' from" in str(w.message) for w in caught)} == warned
    assert {"dot_product", "local", "good_variant"} <= set(names)
    records = {r.name: r for r in reg.records()}
    for entry, h in HOSTILE_PLUGINS.items():
        rec = records[entry]
        assert rec.provider == f"{hostile_dist(entry)} 1.0", entry
        assert rec.status == h.status, (entry, rec)
        where = rec.error if h.status == "failed" else " ".join(rec.warnings)
        assert where is not None and h.text in where, (entry, where)
    failed = [r for r in records.values() if r.status == "failed"]
    for r in failed:  # a failed plugin leaves nothing behind
        assert not r.variants and r.plugin is None
    assert "clash_variant" not in names and reg.get("sdpa").name == "dot_product"
    assert not [p for p in reg._pm.get_plugins() if any(p is r.plugin for r in failed)]


@pytest.mark.parametrize("entry", sorted(HOSTILE_PLUGINS))
def test_each_hostile_plugin_alone(hostile_dir: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """Isolated on its own (no other plugin's failure hides it), and an error under strict mode."""
    h = HOSTILE_PLUGINS[entry]
    monkeypatch.setenv("ATTNREG_PLUGINS", f"{entry},good")
    before = _torch_state()
    reg = _fresh(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "good_variant" in [s.name for s in reg.specs()]
    _assert_same_state(before)
    notes = [str(w.message) for w in caught if issubclass(w.category, attnreg.PluginWarning)]
    assert len(notes) == (h.status == "loaded") and all(h.text in n for n in notes), notes
    rec = next(r for r in reg.records() if r.name == entry)
    assert rec.status == h.status
    monkeypatch.setenv("ATTNREG_STRICT_PLUGINS", "1")
    for mod in [m for m in sys.modules if m.startswith("attnreg_test_")]:
        del sys.modules[mod]  # import it again: strict mode must see what the plugin does
    strict = _fresh(monkeypatch)
    with pytest.raises(PluginLoadError, match=f"plugin '{entry}' from {hostile_dist(entry)} 1.0") as err:
        strict.specs()
    assert h.text in str(err.value)
    _assert_same_state(before)
    with pytest.raises(PluginLoadError):  # and it stays an error, not a half-loaded registry
        strict.get("dot_product")


def test_the_thread_of_a_plugin_gets_an_error_naming_it(hostile_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNREG_PLUGINS", "thread_at_import,thread_in_hook")
    reg = _fresh(monkeypatch)
    with pytest.warns(attnreg.PluginWarning, match="started a thread that used attnreg"):
        reg.specs()
    for entry in ("thread_at_import", "thread_in_hook"):
        outcome = sys.modules[f"attnreg_test_hostile_{entry}"].OUTCOME
        assert "result" not in outcome
        assert isinstance(outcome["error"], PluginLoadError)
        assert f"while plugin '{entry}' from {hostile_dist(entry)} 1.0" in str(outcome["error"])


def test_the_real_deadlock_returns(tmp_path: Path) -> None:
    """The reported case verbatim (a join without timeout) in a fresh process: it must finish."""
    code = ("import threading, attnreg\n"
            "t = threading.Thread(target=attnreg.list_variants)\nt.start()\nt.join()\n")
    make_dist(tmp_path, "attnreg-joiner", "joiner", "attnreg_test_joiner",
              code + GOOD_PLUGIN.format(name="joiner_variant", aliases=()))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for var in ENV:
        env.pop(var, None)
    script = "import attnreg; print(sorted(attnreg.list_variants()))"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "joiner_variant" in proc.stdout and "PluginLoadError" in proc.stderr  # the thread's error


def _cli(args: list[str], root: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400", **extra}
    for var in ENV:
        if var not in extra:
            env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "attnreg", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_doctor_and_list_name_every_hostile_plugin(hostile_dir: Path) -> None:
    doctor = _cli(["doctor"], hostile_dir)
    assert doctor.returncode == 0, doctor.stderr + doctor.stdout  # sys.exit in a plugin exits nothing
    listing = _cli(["list"], hostile_dir)
    assert listing.returncode == 0, listing.stderr + listing.stdout
    for entry, h in HOSTILE_PLUGINS.items():
        for out in (doctor.stdout, listing.stdout):
            lines = [ln for ln in out.splitlines() if entry in ln and hostile_dist(entry) in ln]
            assert lines, (entry, out)
            assert any(h.text in ln for ln in lines), (entry, lines)
    failed = sum(h.status == "failed" for h in HOSTILE_PLUGINS.values())
    warned = sum(h.status == "loaded" for h in HOSTILE_PLUGINS.values())
    assert f"{failed} failed" in doctor.stdout and f"{warned} with warnings" in doctor.stdout
    assert "attnreg.PluginWarning" not in doctor.stderr + listing.stderr  # the CLI prints them itself
    strict = _cli(["doctor"], hostile_dir, ATTNREG_STRICT_PLUGINS="1")
    assert strict.returncode == 1 and "strict plugin loading failed" in strict.stdout


def test_doctor_reports_threads_after_loading(hostile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With restoring disabled the plugin's thread count sticks: doctor shows it, and the count
    from before plugins loaded."""
    from typer.testing import CliRunner

    from attnreg import _isolation
    from attnreg.cli import app

    monkeypatch.setattr(_isolation, "_put_back", lambda setter, value: " (not restored)")
    _fresh(monkeypatch)
    monkeypatch.setenv("ATTNREG_PLUGINS", "num_threads")
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 7
    assert "threads 7 (1 before plugins loaded)" in result.output
    assert "num_threads 1 -> 7 (not restored)" in result.output
