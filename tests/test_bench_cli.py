"""`attnreg bench --quick` end to end: JSON and PNGs written, --compare, `attnreg plot`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from attnreg.cli import app

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_json_and_plots_and_compares(tmp_path: Path) -> None:
    first = tmp_path / "a"
    args = ["bench", "dot_product", "local", "--quick", "--modes", "fwd", "--no-causal"]
    res = runner.invoke(app, [*args, "--out", str(first)])
    assert res.exit_code == 0, res.output
    doc = json.loads((first / "results.json").read_text())
    assert doc["schema"] == "attnreg-bench/1" and doc["status"] == "complete"
    m = doc["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["threads"] == 1 and m["torch"]
    assert doc["roof"]["gflops"] > 0
    series = {p["series"] for p in doc["points"] if p["status"] == "ok"}
    assert {"sdpa", "dot_product", "local", "sdpa_masked[local]", "sdpa_masked_bool[local]"} <= series
    variant = next(p for p in doc["points"] if p["series"] == "local")
    assert variant["time"]["median_s"] > 0 and variant["memory"]["peak_bytes"] is not None
    assert all(variant["speedup"][ref] > 0 for ref in ("sdpa", "sdpa_masked", "sdpa_masked_bool"))
    assert any(r["series"] == "local" and r["time_exponent"] for r in doc["summary"])
    for name in ("time.png", "memory.png"):
        assert (first / name).read_bytes()[:8] == PNG_MAGIC

    second = tmp_path / "b"
    res = runner.invoke(app, [*args[:2], "--quick", "--modes", "fwd", "--no-causal", "--out", str(second),
                              "--compare", str(first / "results.json"), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "compared with the previous run" in res.output
    assert not (second / "time.png").exists()

    res = runner.invoke(app, ["plot", str(first / "results.json"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "memory.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "no_such_variant", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown attention variant" in res.output
    res = runner.invoke(app, ["bench", "--lengths", "12,x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--lengths" in res.output
    (tmp_path / "bad.json").write_text("{}")
    res = runner.invoke(app, ["plot", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "not an attnreg bench results.json" in res.output
