"""pytest nodes of the suite: one collector at the session root, one item per case.

Loaded by ``pytest_plugin`` only when ``--attnreg-variants`` is given. The items are not read
from a file: ``SuitePlugin`` appends ``ConformanceCollector`` to the session's own collection, so
``-k``, ``-m``, ``-x``, ``--junitxml`` and every reporter treat them like ordinary tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ._cases import Case, build_cases, run_case
from ._framework import CHECKS
from ._outcomes import CheckFailure

ROOT_NODEID = "attnreg-conformance"


def format_failure(case: Case, message: str) -> str:
    """The report of a failed check: variant, check, dtype, the finding, what the check means."""
    return (
        f"attnreg conformance: variant '{case.subject}' failed check '{case.check}' "
        f"(group {case.group}, {case.dtype})\n"
        f"  {message}\n"
        f"  The check: {CHECKS[case.check].doc}\n"
        f"  Rerun: attnreg check {case.variant} -k {case.check}"
        + (f"  (the [{case.subject.partition('[')[2]} subject is one of the spec's check_configs)"
           if case.overrides else "")
    )


class ConformanceItem(pytest.Item):
    """One case: runs the check; a ``CheckFailure`` is reported without a traceback."""

    def __init__(self, *, case: Case, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        if case.na:
            self.add_marker(pytest.mark.skip(reason=f"n.a.: {case.na}"))
        elif case.xfail:
            self.add_marker(pytest.mark.xfail(strict=True, reason=case.xfail))

    def runtest(self) -> None:
        run_case(self.case)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CheckFailure):
            return format_failure(self.case, str(excinfo.value))
        # Anything else (a crash inside the variant): a short traceback from the check down,
        # without pytest/pluggy/nn.Module plumbing.
        tb = excinfo.traceback
        start = next((i for i, e in enumerate(tb) if Path(e.path).name.startswith("_checks_")), 0)
        excinfo.traceback = tb[start:].filter(
            lambda e: not str(e.path).endswith("torch/nn/modules/module.py"))
        text = str(excinfo.getrepr(style="short", chain=False))
        notes = "; ".join(getattr(excinfo.value, "__notes__", []))
        what = f"raised {excinfo.type.__name__}: {excinfo.value}" + (f" ({notes})" if notes else "")
        return format_failure(self.case, what) + f"\n{text}"

    def reportinfo(self) -> tuple[Any, int, str]:
        return self.path, 0, f"attnreg conformance: {self.case.id}"


class ConformanceCollector(pytest.Collector):
    """The suite's root: yields a ``ConformanceItem`` per selected case."""

    def __init__(self, *, selection: tuple[Sequence[str], Sequence[str] | None, Sequence[str], str],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selection = selection

    def collect(self) -> Iterator[ConformanceItem]:
        variants, dtypes, xfails, device = self.selection
        for case in build_cases(variants, dtypes=dtypes, xfails=xfails, device=device):
            yield ConformanceItem.from_parent(self, name=case.id, case=case)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, (ValueError, LookupError)):  # unknown variant, bad --attnreg-xfail
            return f"attnreg conformance suite: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)


class SuitePlugin:
    """Adds the suite's collector to the session's collection result."""

    def __init__(self, variants: Sequence[str], dtypes: Sequence[str] | None, xfails: Sequence[str],
                 device: str) -> None:
        self.selection = (list(variants), dtypes, list(xfails), device)

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Any:
        report = yield
        if isinstance(collector, pytest.Session) and report.passed:
            report.result.append(ConformanceCollector.from_parent(
                collector, name=ROOT_NODEID, nodeid=ROOT_NODEID, selection=self.selection))
        return report
