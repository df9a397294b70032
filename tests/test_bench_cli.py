"""`attnreg bench --quick` end to end: JSON and PNGs written, --compare, `attnreg bench-plot`."""

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
    res = runner.invoke(app, [*args, "--out", str(first)], env={"COLUMNS": "200"})
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
    # Two lengths (32, 64): no scaling exponent is fitted, and the summary is one row per variant.
    assert all(r["time_exponent"] is None and r["memory_exponent"] is None for r in doc["summary"])
    assert "L^" not in res.output and "scaling" not in res.output
    assert len(res.output.splitlines()) < 25, res.output
    local_row = next(line for line in res.output.splitlines() if line.startswith("│ local "))
    assert "gate passed" in local_row and "L=64:" in local_row
    for name in ("time.png", "memory.png"):
        assert (first / name).read_bytes()[:8] == PNG_MAGIC

    second = tmp_path / "b"
    # Gate even the tiny quick lengths, with a factor no noise reaches: the guard's plumbing.
    res = runner.invoke(app, [*args[:2], "--quick", "--modes", "fwd", "--no-causal", "--out", str(second),
                              "--compare", str(first / "results.json"), "--no-plots", "--guard-from", "1",
                              "--max-slowdown", "1000"])
    assert res.exit_code == 0, res.output
    assert "speed guard against the baseline" in res.output
    assert "local fwd L=32: not planned in this run" in res.output  # only dot_product this time
    report = json.loads((second / "compare.json").read_text())
    assert report["status"] == "pass" and report["gated_points"] == 2  # dot_product at L=32, 64
    assert {c["series"] for c in report["changes"]} == {"dot_product"}
    assert not (second / "time.png").exists()

    res = runner.invoke(app, ["bench-plot", str(first / "results.json"), "--out", str(tmp_path / "c"),
                              "--tables"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "memory.png").read_bytes()[:8] == PNG_MAGIC
    assert "sdpa_masked_bool[local]" in res.output  # --tables: every point


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "no_such_variant", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown attention variant" in res.output
    res = runner.invoke(app, ["bench", "--lengths", "12,x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--lengths" in res.output
    res = runner.invoke(app, ["bench", "--ci", "local", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--ci runs a fixed preset" in res.output and "variant names" in res.output
    res = runner.invoke(app, ["bench", "--ci", "--lengths", "1K", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "lengths" in res.output
    res = runner.invoke(app, ["bench", "--quick", "--max-slowdown", "0.5", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--max-slowdown" in res.output
    (tmp_path / "bad.json").write_text("{}")
    res = runner.invoke(app, ["bench-plot", str(tmp_path / "bad.json")])
    assert res.exit_code == 2 and "not an attnreg bench results.json" in res.output
