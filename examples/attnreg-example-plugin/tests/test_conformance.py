"""Run attnreg's shipped conformance suite on this plugin's variant: the same checks the
built-ins pass, one test per check and dtype."""

import pytest

from attnreg.conformance import pytest_params, run_case


@pytest.mark.parametrize("case", pytest_params(["sigmoid"]))
def test_sigmoid_conformance(case):
    run_case(case)
