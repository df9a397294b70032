"""Every code block of README.md and docs/ runs (tests/docs_blocks.py says how each is run), and
the plugin guide's example and the README's model-layer snippet do what they say."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from docs_blocks import LANGUAGES, Block, bash_commands, blocks, doc_files

import attnreg

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _plugin_guide_module(name: str) -> types.ModuleType:
    """The plugin guide's first python block, executed as module ``name`` (as a plugin's would be)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    mod = types.ModuleType(name)
    exec(compile(code, "docs/plugins.md", "exec", dont_inherit=True), mod.__dict__)
    return mod


def test_plugin_guide_example_registers_and_builds() -> None:
    attnreg.register(_plugin_guide_module("my_package_plugin"))
    try:
        attn = attnreg.build("my_attn", temperature=2.0)
        q = torch.randn(1, 2, 5, 4, dtype=torch.float64)  # (B, H, L, E)
        out = attn(q, q, q, is_causal=True)
        expected = attnreg.build("sdpa", scale=0.5 / 2.0)(q, q, q, is_causal=True)
        assert torch.allclose(out, expected, atol=1e-12)
    finally:
        attnreg.unregister("my_attn")


def test_readme_model_layer_snippet_generates_like_recomputation(capsys) -> None:
    """The README's MultiHeadAttention snippet runs; its stateful generation equals recomputing
    the causal forward over the whole sequence at every step."""
    text = (ROOT / "README.md").read_text()
    blocks = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if "MultiHeadAttention" in c and ".decode(" in c]
    assert len(blocks) == 1
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec", dont_inherit=True), ns)
    layer, embed, head, prompt, real = (ns[n] for n in ("layer", "embed", "head", "prompt", "real"))
    generated = torch.stack(ns["tokens"], 1)  # (B, 8)
    assert generated.shape == (2, 8) and ns["state"].length == 5 + 7  # the last token is not fed
    assert str(generated[0, 0].item()) in capsys.readouterr().out
    seq, mask = prompt, real
    with torch.no_grad():
        for t in range(8):  # no state: the whole sequence again for every token
            nxt = head(layer(embed(seq), key_mask=mask, is_causal=True)[:, -1]).argmax(-1)  # (B,)
            assert torch.equal(nxt, generated[:, t])
            seq = torch.cat([seq, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)


# -- every code block of README.md and docs/ (tests/docs_blocks.py says how each is run) ------

ALL_BLOCKS = [b for path in doc_files() for b in blocks(path)]


def _pages(lang: str) -> list[Path]:
    return sorted({b.path for b in ALL_BLOCKS if b.lang == lang and b.skip is None})


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_block_names_its_language_and_every_skip_its_reason() -> None:
    assert len(ALL_BLOCKS) > 40
    unknown = [f"{b.where} ```{b.lang}" for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"fenced blocks need one of {LANGUAGES} (text for output): {unknown}"
    for path in doc_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "docs-test:" in line:
                assert re.match(r"^\s*<!-- docs-test: skip \(.{10,}\) -->\s*$", line), \
                    f"{_page_id(path)}:{n}: write <!-- docs-test: skip (the reason) -->"
    skipped = [b for b in ALL_BLOCKS if b.skip]
    assert all(b.lang in ("python", "bash") for b in skipped), [b.where for b in skipped]


def _write_named_files(block: Block) -> None:
    """A yaml block whose first line is ``# NAME.yaml`` is that file's content."""
    m = re.match(r"#\s*(\S+\.ya?ml)\s*$", block.code.splitlines()[0]) if block.lang == "yaml" else None
    if m:
        Path(m.group(1)).write_text(block.code)


@pytest.mark.parametrize("page", _pages("python"), ids=_page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The python blocks of a page, in order, in one namespace (files they write go to a
    temporary folder)."""
    monkeypatch.chdir(tmp_path)
    page_blocks = [b for b in ALL_BLOCKS if b.path == page]
    if any("transformers" in b.code for b in page_blocks if b.lang == "python"):
        pytest.importorskip("transformers", reason="the hf extra is not installed")
    ns: dict = {"__name__": "__docs__"}
    torch.manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        for b in page_blocks:
            _write_named_files(b)
            if b.lang != "python" or b.skip:
                continue
            try:
                exec(compile(b.code, b.where, "exec", dont_inherit=True), ns)
            except Exception as exc:
                raise AssertionError(f"{b.where}: the python block raised {exc!r}") from exc


@pytest.mark.parametrize("page", _pages("bash"), ids=_page_id)
def test_bash_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bash blocks of a page, command by command, in a temporary folder that sees the
    repository's examples/, benchmarks/ and docs/: `attnreg ...` through the CLI in-process,
    anything else in a shell."""
    from typer.testing import CliRunner

    from attnreg.cli import app

    for name in ("examples", "benchmarks", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for b in (b for b in ALL_BLOCKS if b.path == page):
        _write_named_files(b)
        if b.lang != "bash" or b.skip:
            continue
        for command in bash_commands(b.code):
            argv = shlex.split(command)
            if argv[0] == "attnreg":
                res = runner.invoke(app, argv[1:], env={"COLUMNS": "200"})
                assert res.exit_code == 0, f"{b.where}: `{command}` exited {res.exit_code}:\n{res.output}"
            else:
                proc = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                                      timeout=300, env={**os.environ, "PATH": _path_with_python()})
                assert proc.returncode == 0, f"{b.where}: `{command}`:\n{proc.stdout}\n{proc.stderr}"


def _path_with_python() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("yaml", "json", "toml")],
                         ids=lambda b: b.where)
def test_config_blocks_parse_and_validate(block: Block) -> None:
    if block.lang == "toml":
        tomllib.loads(block.code)
        return
    data = yaml.safe_load(block.code) if block.lang == "yaml" else json.loads(block.code)
    for config in (data, (data or {}).get("attention") if isinstance(data, dict) else None):
        if isinstance(config, dict) and "variant" in config:
            attnreg.validate_config(config)


def test_plugin_guide_example_passes_the_conformance_suite() -> None:
    """The guide's module, registered as a plugin would be, passes every check that applies."""
    from attnreg.conformance.runner import run

    attnreg.register(_plugin_guide_module("my_package_plugin_suite"))
    try:
        report = run(["my_attn"])
    finally:
        attnreg.unregister("my_attn")
    assert report.ok, "\n\n".join(f"{r.check} [{r.dtype}]: {r.message}" for r in report.failed)
    assert sum(r.outcome == "passed" for r in report.results) >= 20
