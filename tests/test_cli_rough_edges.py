"""The CLI's rough edges found by a new user (issue 17), one test each: numpy declared, tables
whole in a pipe, markup printed as written, plain help, a progress total known from the start,
a short quick-bench summary without two-point fits, legends outside the data, an unusable
device as a usage error, and a broken plugin named wherever its variant is asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_fixtures import make_dist
from typer.testing import CliRunner

import attnreg
from attnreg._plugins import Registry
from attnreg.cli import app
from attnreg.core import UnknownVariantError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _piped(*args: str) -> str:
    """Run the CLI in-process with output that is not a terminal and no COLUMNS (a pipe)."""
    res = runner.invoke(app, list(args), env={"COLUMNS": None})
    assert res.exit_code == 0, res.output
    return res.output


def test_numpy_is_a_declared_dependency() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "numpy" for d in deps), deps
    import numpy  # noqa: F401  installed with the project, so torch's conversion works

    assert torch.ones(2).numpy().tolist() == [1.0, 1.0]


def test_list_keeps_whole_rows_in_a_real_pipe() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "attnreg", "list"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr, proc.stderr  # torch's "Failed to initialize NumPy" warning
    for spec in attnreg.REGISTRY.specs():
        # name, provider and the whole complexity text on one line: nothing wrapped at 80 columns
        rows = [line for line in proc.stdout.splitlines() if f" {spec.name} " in line]
        assert any(spec.capabilities.complexity in r and "attnreg" in r for r in rows), (spec.name, rows)


def test_show_and_doctor_keep_width_and_print_markup_as_written() -> None:
    out = _piped("show", "sparse")
    assert "[[query_block, key_block], ...]" in out
    field_lines = [line for line in out.splitlines() if line.startswith("│ custom_blocks ")]
    assert field_lines and "list[list[int]] | None" in field_lines[0]
    doctor = _piped("doctor")
    row = next(line for line in doctor.splitlines() if " dot_product " in line and "loaded" in line)
    assert "attnreg.plugins.dot_product" in row  # entry point, distribution, target on one line


def test_help_shows_plain_names_and_no_bool_metavar() -> None:
    commands = [c.name for c in app.registered_commands]
    assert {"list", "show", "check", "bench", "bench-plot", "plot", "new-plugin"} <= set(commands)
    for args in ([], *([c] for c in commands)):
        out = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "120"}).output
        assert "<bool>" not in out and "{" not in out, (args, out)
    show = runner.invoke(app, ["show", "--help"]).output
    assert "attnreg show [OPTIONS] NAME" in show
    check = runner.invoke(app, ["check", "--help"], env={"COLUMNS": "120"}).output
    assert "attnreg check [OPTIONS] [NAME...]" in check
    assert "'check[variant-dtype]' names" in check  # help text is not eaten as rich markup
    assert "--json" in check and "PATH" in check


def test_check_progress_total_is_known_before_any_case_runs() -> None:
    from attnreg.conformance.runner import run

    events: list[tuple[str, object]] = []
    report = run(["dot_product"], keyword="config_schema or scale_honoured",
                 on_total=lambda n: events.append(("total", n)),
                 on_start=lambda case: events.append(("start", case.check)),
                 on_result=lambda r: events.append(("result", r.check)))
    assert events[0][0] == "total" and events[0][1] >= 30  # every planned case of dot_product
    first_start = next(i for i, e in enumerate(events) if e[0] == "start")
    totals = [n for kind, n in events[:first_start] if kind == "total"]
    assert totals[-1] == len(report.results) == 2  # after -k deselection, before the first case
    kinds = [k for k, _ in events[first_start:]]
    assert kinds == ["start", "result"] * 2  # each case announced as it starts, counted as it ends


def test_check_on_an_unusable_device_is_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this torch has a usable CUDA device")
    res = runner.invoke(app, ["check", "dot_product", "--device", "cuda"])
    assert res.exit_code == 2, res.output
    assert "device 'cuda' is not usable" in res.output and len(res.output.splitlines()) <= 3
    res = runner.invoke(app, ["check", "dot_product", "--device", "gpu0"])
    assert res.exit_code == 2 and "device 'gpu0' is not a torch device" in res.output


def test_legends_sit_outside_the_data() -> None:
    from attnreg.bench.plots import results_figure

    doc = json.loads((ROOT / "docs" / "bench" / "results.json").read_text())
    fig = results_figure(doc, "time")
    fig.canvas.draw()
    legends = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if not ax.get_visible() or legend is None:
            continue
        legends += 1
        box, data = legend.get_window_extent(), ax.get_window_extent()
        assert not box.overlaps(data), ax.get_title()
        for other in fig.axes:  # nor over a neighbouring panel
            if other is not ax and other.get_visible():
                assert not box.overlaps(other.get_window_extent()), (ax.get_title(), other.get_title())
    assert legends == 4


@pytest.fixture
def broken_cosine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A registry that found an installed plugin 'cosine' whose import fails."""
    make_dist(tmp_path, "attnreg-cosine", "cosine", "attnreg_test_cosine",
              "raise ImportError('needs attnreg-cosine-kernels')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("ATTNREG_DISABLE_PLUGIN_AUTOLOAD", "ATTNREG_PLUGINS", "ATTNREG_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reg = Registry()
    for module in (attnreg, attnreg._plugins, attnreg._configs):
        monkeypatch.setattr(module, "REGISTRY", reg, raising=False)
    yield reg
    sys.modules.pop("attnreg_test_cosine", None)


def test_a_plugin_that_failed_to_load_is_named_with_its_error(broken_cosine: Registry) -> None:
    for ask in (lambda: broken_cosine.get("cosine"), lambda: attnreg.build("cosine"),
                lambda: attnreg.get_variant("Cosine")):  # compared as pip compares names
        with pytest.raises(UnknownVariantError) as err:
            ask()
        text = str(err.value)
        assert "plugin 'cosine' from attnreg-cosine 1.0" in text and "failed to load" in text
        assert "ImportError: needs attnreg-cosine-kernels" in text and "Did you mean" not in text
    with pytest.raises(UnknownVariantError, match="failed to load .*'cosine' from attnreg-cosine 1.0"):
        attnreg.build("cosinus")  # another name: the broken plugin is listed as a candidate
    res = runner.invoke(app, ["check", "cosine"], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "plugin 'cosine' from attnreg-cosine 1.0" in res.output
    assert "Did you mean" not in res.output
