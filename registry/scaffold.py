"""``attnreg new-plugin``: write a plugin distribution that passes ``attnreg check`` as generated.

The generated variant is softmax attention with a ``temperature`` field: the smallest complete
example of the contract (masks, causal, cross attention, float32 accumulation for half inputs,
``scale`` honoured, ``dropout`` refused, decoding through attnreg's KV cache), with its float64
reference, tests against it and the shipped conformance suite. Its author replaces the math.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from attnreg.core import ConfigError

__all__ = ["NAME_PATTERN", "plugin_files", "write_plugin"]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
TEMPLATES = "scaffold_templates"

# template file -> path in the new distribution ($package: the import name)
_LAYOUT = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "init.py.tmpl": "src/$package/__init__.py",
    "attention.py.tmpl": "src/$package/attention.py",
    "reference.py.tmpl": "src/$package/reference.py",
    "test_conformance.py.tmpl": "tests/test_conformance.py",
    "test_variant.py.tmpl": "tests/test_$name.py",
}


def _names(name: str) -> dict[str, str]:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"plugin name {name!r} must match {NAME_PATTERN.pattern} (a lower-case variant "
                          "name: letters, digits and _, starting with a letter, at most 40 characters)")
    from attnreg import __version__

    camel = "".join(part.capitalize() for part in name.split("_") if part)
    major_minor = ".".join(__version__.split(".")[:2]) if __version__[0].isdigit() else "0.1"
    return {"name": name, "package": f"attnreg_{name}", "dist": f"attnreg-{name.replace('_', '-')}",
            "Camel": camel, "attnreg_version": major_minor}


def plugin_files(name: str) -> dict[str, str]:
    """The new distribution's files for variant ``name``: {relative path: text}."""
    values = _names(name)
    root = resources.files("attnreg").joinpath(TEMPLATES)
    files = {}
    for template, target in _LAYOUT.items():
        text = Template(root.joinpath(template).read_text(encoding="utf-8")).substitute(values)
        files[Template(target).substitute(values)] = text
    return files


def write_plugin(name: str, directory: Path | str | None = None) -> tuple[Path, list[Path]]:
    """Write the distribution of variant ``name`` into ``directory`` (default ``./attnreg-NAME``),
    which must not exist or be empty; return it and the files written. A name already
    registered is refused: the new plugin would fail to load next to the one that has it."""
    import attnreg

    values = _names(name)
    if _taken(name):
        provider = attnreg.REGISTRY.provider(name)
        raise ConfigError(f"variant name {name!r} is already registered (by {provider}); choose another")
    target = Path(directory) if directory is not None else Path(values["dist"])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{str(target)!r} exists and is not an empty folder; choose another --dir")
    written = []
    for rel, text in plugin_files(name).items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return target, written


def _taken(name: str) -> bool:
    import attnreg

    try:
        attnreg.get_variant(name)
    except LookupError:
        return False
    return True
