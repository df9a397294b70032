"""mkdocs hooks (mkdocs.yml ``hooks:``): lay out the package for the API reference.

attnreg's sources live in ``registry/`` (``attnreg``), ``core/`` (``attnreg.core``) and
``plugins/`` (``attnreg.plugins``), mapped by setuptools' ``package-dir``. mkdocstrings (griffe)
finds a package by its folder name, so the build gets a tree of symlinks named as the import
names: ``build/mkdocs-api-src/attnreg/`` with ``core`` and ``plugins`` inside.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]
API_SRC = ROOT / "build" / "mkdocs-api-src"


def api_source_tree(root: Path = ROOT, target: Path = API_SRC) -> Path:
    """(Re)build the symlink tree; return the folder to put on griffe's search path."""
    package = target / "attnreg"
    if target.exists():
        shutil.rmtree(target)
    package.mkdir(parents=True)
    for entry in (root / "registry").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "core").symlink_to(root / "core")
    (package / "plugins").symlink_to(root / "plugins")
    return target


@event_priority(100)  # before mkdocstrings' on_config, which drops search paths that do not exist
def on_config(config: Any) -> Any:
    """Before mkdocstrings sets up its handler: the tree exists (mkdocs.yml names its path)."""
    api_source_tree()
    return config
