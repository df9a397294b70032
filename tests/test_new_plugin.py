"""`attnreg new-plugin`: the scaffolded distribution is found through its entry point and passes
its own tests and the shipped conformance suite as generated; bad requests are usage errors.
(CI also pip-installs a scaffolded plugin and runs `attnreg check` on it: .ci/run.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from attnreg.cli import app
from attnreg.scaffold import plugin_files

runner = CliRunner()


def _entry_point_metadata(root: Path, dist: str, name: str, package: str) -> None:
    """What `pip install` would write: a .dist-info declaring the entry point."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[attnreg]\n{name} = {package}\n")


def test_scaffolded_plugin_passes_its_tests_and_the_conformance_suite(tmp_path: Path) -> None:
    target = tmp_path / "attnreg-cosine-attn"
    res = runner.invoke(app, ["new-plugin", "cosine_attn", "--dir", str(target)])
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/attnreg_cosine_attn/__init__.py",
                     "src/attnreg_cosine_attn/attention.py", "src/attnreg_cosine_attn/reference.py",
                     "tests/test_conformance.py", "tests/test_cosine_attn.py"]
    pyproject = (target / "pyproject.toml").read_text()
    assert '[project.entry-points.attnreg]\ncosine_attn = "attnreg_cosine_attn"' in pyproject
    _entry_point_metadata(tmp_path / "meta", "attnreg-cosine-attn", "cosine_attn", "attnreg_cosine_attn")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target / "src"), str(tmp_path / "meta")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"],
                          cwd=target, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "passed" in last and "failed" not in last and "error" not in last, last
    assert int(last.split()[0]) >= 40  # the conformance cases ran, not only the variant's own tests


def test_templates_fill_every_placeholder() -> None:
    for path, text in plugin_files("my_attn").items():
        assert "$" not in text, path
        if path.endswith(".py"):
            compile(text, path, "exec")


def test_new_plugin_usage_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["new-plugin", "Bad-Name", "--dir", str(tmp_path / "x")])
    assert res.exit_code == 2 and "must match" in res.output
    res = runner.invoke(app, ["new-plugin", "local", "--dir", str(tmp_path / "y")])
    assert res.exit_code == 2 and "already registered" in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["new-plugin", "fresh_attn", "--dir", str(tmp_path / "full")])
    assert res.exit_code == 2 and "not an empty folder" in res.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
