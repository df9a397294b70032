"""The shipped conformance suite over every built-in variant (timm-style: one test per
variant x check x dtype). A third-party plugin's own tests do exactly this with its own names."""

from __future__ import annotations

import pytest

import attnreg
from attnreg._plugins import BUILTIN_DIST, REGISTRY
from attnreg.conformance import pytest_params, run_case


def _builtin_variants() -> list[str]:
    """Variants shipped in the attnreg distribution itself (entry points of this project)."""
    return [n for n in attnreg.list_variants() if REGISTRY.provider(n).split(" ")[0] == BUILTIN_DIST]


BUILTINS = _builtin_variants()


def test_builtins_are_registered() -> None:
    assert "dot_product" in BUILTINS


@pytest.mark.parametrize("case", pytest_params(BUILTINS))
def test_conformance(case) -> None:  # noqa: ANN001 - a conformance Case
    run_case(case)
