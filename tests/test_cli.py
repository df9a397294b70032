"""CLI: every command through typer's runner, and once through the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

import attnreg
from attnreg.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def test_list_shows_every_variant_with_provider_and_capabilities() -> None:
    res = _run("list")
    assert res.exit_code == 0, res.output
    for name in attnreg.list_variants():
        assert name in res.output
    assert "sdpa" in res.output and "attnreg 0.1.0" in res.output and "O(Lq*Lk*E)" in res.output
    linear = next(line for line in res.output.splitlines() if line.startswith("│ linear "))
    assert "decoding" in linear and "context_parallel" in linear and "double_backward" in linear


def test_show_prints_fields_bounds_and_capabilities() -> None:
    res = _run("show", "sdpa")
    assert res.exit_code == 0, res.output
    for text in ("dot_product", "Vaswani", "dropout", ">= 0.0", "< 1.0", "scale", "> 0.0",
                 "permutation_invariant", "float_mask", "decoding", "grouped_query"):
        assert text in res.output


def test_unknown_name_is_a_usage_error_with_suggestion() -> None:
    res = _run("show", "dot_prodcut")
    assert res.exit_code == 2
    assert "Did you mean 'dot_product'" in res.output
    assert "Traceback" not in res.output


def test_schema_is_valid_json_for_union_and_one_variant() -> None:
    res = _run("schema")
    assert res.exit_code == 0, res.output
    schema = json.loads(res.output)
    text = json.dumps(schema)
    for name in attnreg.list_variants():
        assert name in text
    one = json.loads(_run("schema", "sdpa").output)
    assert one["properties"]["variant"]["const"] == "dot_product"
    assert one["additionalProperties"] is False


def test_doctor_reports_environment() -> None:
    res = _run("doctor")
    assert res.exit_code == 0, res.output
    for text in ("torch", "threads", "ATTNREG_STRICT_PLUGINS", "dot_product", "loaded"):
        assert text in res.output


def test_version_and_usage_error() -> None:
    assert _run("--version").output.strip() == f"attnreg {attnreg.__version__}"
    assert _run("no-such-command").exit_code == 2


@pytest.mark.skipif(shutil.which("attnreg") is None, reason="console script not installed")
def test_installed_console_script() -> None:
    ok = subprocess.run(["attnreg", "show", "dot_product"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Vaswani" in ok.stdout
    bad = subprocess.run(["attnreg", "show", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown attention variant 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
