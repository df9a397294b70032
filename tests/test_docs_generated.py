"""The generated parts of the docs are current: the config reference, the command-line
reference, the plugin guide's Capabilities table and the variant pages' measured tables are
exactly what docs/_tools/generate.py writes now, and every pattern picture exists and is shown.
Regenerate with `python docs/_tools/generate.py all` (pictures only when a variant changes)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import attnreg

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "_tools" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

STALE = "is stale: run `python docs/_tools/generate.py {}` and commit the result"


def test_config_reference_is_generated_from_the_models() -> None:
    page = generate.CONFIGS_PAGE.read_text()
    assert page == generate.configs_page(), STALE.format("configs")
    for spec in generate.builtin_specs():  # every built-in, every field
        assert f"## {spec.name}\n" in page
        for field in spec.config.model_fields:
            assert field == "variant" or f"| `{field}`" in page, (spec.name, field)


def test_cli_reference_is_the_commands_help() -> None:
    assert generate.CLI_PAGE.read_text() == generate.cli_page(), STALE.format("cli")


def test_capabilities_table_covers_every_field() -> None:
    import dataclasses

    from attnreg.core import Capabilities

    text = generate.CAPS_PAGE.read_text()
    assert text == generate.fill_capabilities(text), STALE.format("capabilities")
    for f in dataclasses.fields(Capabilities):
        assert f"| `{f.name}` |" in text, f.name


@pytest.mark.parametrize("page", generate.variant_pages(), ids=lambda p: p.name)
def test_variant_page_has_its_picture_and_one_current_table(page: Path) -> None:
    text = page.read_text()
    doc = json.loads(generate.RESULTS.read_text())
    assert text == generate.fill_numbers(text, doc), STALE.format("numbers")
    assert generate.NUMBERS.search(text), f"{page.name} has no <!-- numbers: SERIES --> table"
    shown = re.findall(r"!\[[^\]]*\]\(\.\./pictures/([^)]+)\)", text)
    assert shown and all((ROOT / "docs" / "pictures" / name).is_file() for name in shown), shown
    assert "prototype" not in text.lower(), "measurement history belongs in the bench JSON files"


def test_every_picture_exists_is_shown_and_every_builtin_has_one() -> None:
    pages = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    for name, (variant, _) in generate.PICTURES.items():
        path = ROOT / "docs" / "pictures" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"pictures/{name})" in pages, f"{name} is not shown on any page"
        attnreg.get_variant(variant)
    pictured = {v for v, _ in generate.PICTURES.values()}
    assert {s.name for s in generate.builtin_specs()} <= pictured
