"""The ``attnreg`` command line (typer + rich). Exit codes: 0 ok, 1 failure, 2 usage error.

Each sub-command lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

from ._app import app, main

# Importing a command module registers its commands on ``app``.
from . import _info  # noqa: E402,F401  isort: skip
from . import check  # noqa: E402,F401  isort: skip
from . import bench  # noqa: E402,F401  isort: skip
from . import plot  # noqa: E402,F401  isort: skip
from . import new_plugin  # noqa: E402,F401  isort: skip

__all__ = ["app", "main"]
