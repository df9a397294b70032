"""attnreg.conformance: the conformance suite every registered variant must pass.

Three ways to run it (the same checks each time):

- ``attnreg check [NAME ...]``: the CLI front end (a table, ``--json``, ``--junit``).
- ``pytest --attnreg-variants=NAME[,NAME]`` in any project (the ``pytest11`` plugin).
- from a test file::

      import pytest
      from attnreg.conformance import pytest_params, run_case

      @pytest.mark.parametrize("case", pytest_params(["my_attn"]))
      def test_conformance(case):
          run_case(case)

This package is imported by every pytest run (through ``pytest_plugin``), so it stays cheap:
the checks (and torch) load on first attribute access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "CHECKS", "GROUPS", "TOLERANCES", "Case", "CheckFailure", "NotApplicable", "assert_close",
    "assert_matches_weights", "build_cases", "parse_xfail", "pytest_params", "run", "run_case",
    "run_check", "sizes_of", "weights_oracle",
]

_LAZY = {
    "CHECKS": "._framework", "GROUPS": "._framework", "TOLERANCES": "._asserts",
    "assert_close": "._asserts", "assert_matches_weights": "._asserts", "sizes_of": "._asserts",
    "weights_oracle": "._asserts",
    "CheckFailure": "._outcomes", "NotApplicable": "._outcomes",
    "Case": "._cases", "build_cases": "._cases", "parse_xfail": "._cases", "pytest_params": "._cases",
    "run_case": "._cases", "run_check": "._cases", "run": ".runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # _cases imports every check module, so CHECKS is complete whichever name is asked first.
        import_module("._cases", __name__)
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'attnreg.conformance' has no attribute {name!r}")
