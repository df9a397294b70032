"""`attnreg plot`: every registered variant's pattern and weights picture, a runtime (third-party)
variant too, and what the pictures claim checked against the modules."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from plugin_fixtures import GOOD_PLUGIN
from typer.testing import CliRunner

import attnreg
from attnreg.cli import app
from attnreg.core import ConfigError, causal_mask
from attnreg.pictures import parse_fields, pattern_picture

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", attnreg.list_variants())
def test_plot_every_registered_variant(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.png"
    causal = attnreg.get_variant(name).capabilities.causal
    res = runner.invoke(app, ["plot", name, "--length", "24", *(["--causal"] if causal else []),
                              "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_MAGIC and f"plot: {out}" in res.output
    pic = pattern_picture(name, length=24, causal=causal)
    assert pic.allowed.shape == pic.weights.shape == (24, 24)
    # weights only where the pattern allows, and (causal) nothing above the diagonal
    assert torch.all(pic.weights[~pic.allowed] == 0)
    if causal:
        assert not torch.any(pic.allowed & ~causal_mask(24, 24, torch.device("cpu")))
    if attnreg.get_variant(name).capabilities.normalized:
        rows = pic.allowed.any(-1)
        assert torch.allclose(pic.weights.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=torch.float64))


def test_grid_and_config_in_the_title(tmp_path: Path) -> None:
    out = tmp_path / "local.png"
    res = runner.invoke(app, ["plot", "local", "window=3", "--grid", "--length", "16", "--length", "32",
                              "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "local, window=3; pattern from pattern_mask" in res.output
    band = pattern_picture("local", {"window": 3}, length=16)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(band.allowed, (i - j).abs() <= 3)
    # the inline form of `attnreg bench` names the same config
    res = runner.invoke(app, ["plot", "local:window=3", "--length", "16", "--out", str(out)])
    assert res.exit_code == 0 and "window=3" in res.output


def test_a_runtime_registered_variant_is_plotted_from_its_weights(tmp_path: Path) -> None:
    mod = types.ModuleType("plot_test_plugin")
    code = GOOD_PLUGIN.format(name="plot_test_variant", aliases=())
    exec(compile(code, "plot_test_plugin", "exec", dont_inherit=True), mod.__dict__)
    attnreg.register(mod)
    try:
        out = tmp_path / "third.png"
        res = runner.invoke(app, ["plot", "plot_test_variant", "--causal", "--length", "12",
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert "pattern from weights support" in res.output and out.read_bytes()[:8] == PNG_MAGIC
        pic = pattern_picture("plot_test_variant", length=12, causal=True)
        assert torch.equal(pic.allowed, causal_mask(12, 12, torch.device("cpu")))
    finally:
        attnreg.unregister("plot_test_variant")


def test_plot_usage_errors(tmp_path: Path) -> None:
    bench = tmp_path / "results.json"
    bench.write_text("{}")
    res = runner.invoke(app, ["plot", str(bench), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "attnreg bench-plot" in res.output
    res = runner.invoke(app, ["plot", "local", "windw=3", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "did you mean 'window'" in res.output
    res = runner.invoke(app, ["plot", "local", "--length", "0", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "length must be an integer in 1..4096" in res.output
    res = runner.invoke(app, ["plot", "nope", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "unknown attention variant 'nope'" in res.output
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        parse_fields(["window"])
    assert parse_fields(["window=8", "layout=bigbird", "custom_blocks=[[0, 0]]"]) == {
        "window": 8, "layout": "bigbird", "custom_blocks": [[0, 0]]}
