"""Run the suite in-process through ``pytest.main`` and collect one result per case.

Used by ``attnreg check``. The run is isolated from the current directory's project: an empty
ini file and an empty root directory, so only the suite's items are collected and the user's
``conftest.py``, ``addopts`` and test files play no part.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch

import attnreg
from attnreg.core.dtypes import parse_dtype

from ._cases import Case, build_cases, parse_xfail, select_specs
from ._framework import CHECKS, config_label

__all__ = ["Report", "Result", "check_device", "run"]

PLUGIN_MODULE = "attnreg.conformance.pytest_plugin"
FAILING = ("failed", "error", "xpassed")


@dataclass
class Result:
    """Outcome of one case: passed | failed | error | xfailed | xpassed (strict: a failure) | n.a."""

    variant: str
    check: str
    group: str
    dtype: str
    outcome: str
    duration_s: float = 0.0
    message: str = ""
    subject: str = ""  # "local", or "local[window=2,block_size=4]" under one of its check_configs
    overrides: dict[str, Any] = field(default_factory=dict)  # that check_configs entry ({} = default)

    def __post_init__(self) -> None:
        self.subject = self.subject or self.variant


@dataclass
class Report:
    """Everything ``attnreg check`` prints or writes."""

    variants: list[str]
    results: list[Result] = field(default_factory=list)
    collection_errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    pytest_exit_code: int = 0
    subjects: list[str] = field(default_factory=list)  # variants and their check_configs, table rows

    def __post_init__(self) -> None:
        self.subjects = self.subjects or list(self.variants)

    @property
    def failed(self) -> list[Result]:
        """Failing results (failures, errors, unexpected passes of strict expected failures)."""
        return [r for r in self.results if r.outcome in FAILING]

    @property
    def ok(self) -> bool:
        """True when at least one check ran and nothing failed."""
        ran = any(r.outcome != "n.a." for r in self.results)
        return ran and not self.failed and not self.collection_errors

    def counts(self) -> dict[str, int]:
        """Number of results per outcome."""
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON report (``attnreg check --json``)."""
        return {
            "attnreg_version": attnreg.__version__, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "duration_s": round(self.duration_s, 3),
            "variants": self.variants, "subjects": self.subjects, "distinct_checks": len(CHECKS),
            "summary": self.counts(),
            "ok": self.ok, "collection_errors": self.collection_errors,
            "results": [asdict(r) for r in self.results],
        }


class _Recorder:
    """pytest plugin object: turns reports of the suite's items into ``Result``s."""

    def __init__(self, on_total: Callable[[int], None] | None, on_result: Callable[[Result], None] | None,
                 on_start: Callable[[Case], None] | None = None):
        self.cases: dict[str, Case] = {}
        self.results: dict[str, Result] = {}
        self.errors: list[str] = []
        self.on_total, self.on_result, self.on_start = on_total, on_result, on_start

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        case = getattr(item, "case", None)
        if isinstance(case, Case):
            self.cases[item.nodeid] = case

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.errors.append(f"{report.nodeid or 'collection'}: {report.longreprtext}")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.on_total:
            self.on_total(sum(1 for i in session.items if i.nodeid in self.cases))

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        case = self.cases.get(nodeid)
        if case is not None and self.on_start:
            self.on_start(case)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        outcome = None
        message = ""
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if hasattr(report, "wasxfail"):
                outcome, message = ("xfailed" if report.skipped else "xpassed"), report.wasxfail
            elif report.skipped:
                outcome = "n.a."
                longrepr = report.longrepr
                message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
                message = message.removeprefix("Skipped: ").removeprefix("n.a.: ")
            elif report.failed:
                text = report.longreprtext
                strict_xpass = text.startswith("[XPASS(strict)]")
                outcome = "xpassed" if strict_xpass else ("failed" if report.when == "call" else "error")
                reason = text.removeprefix("[XPASS(strict)]").strip()
                message = f"expected failure did not fail (strict): {reason}" if strict_xpass else text
            else:
                outcome = "passed"
        elif report.when == "teardown" and report.failed:
            outcome, message = "error", report.longreprtext
        if outcome is None:
            return
        prev = self.results.get(report.nodeid)
        if prev is not None and outcome != "error":
            return
        result = Result(case.variant, case.check, case.group, case.dtype, outcome,
                        round(getattr(report, "duration", 0.0), 4), message, case.subject,
                        dict(case.overrides))
        self.results[report.nodeid] = result
        if self.on_result and prev is None:
            self.on_result(result)


def _plugin_autoloads() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == PLUGIN_MODULE for ep in entry_points(group="pytest11"))


def check_device(device: str) -> torch.device:
    """``torch.device(device)`` if this torch can allocate a tensor there; otherwise a
    ``ValueError`` naming the device (e.g. ``cuda`` on a CPU-only build of torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    try:
        torch.empty(1, device=dev)
    except (AssertionError, RuntimeError, ValueError) as exc:  # a torch without that backend
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"device {device!r} is not usable with this torch ({torch.__version__}): "
                         f"{first}") from None
    return dev


def run(variants: Sequence[str] | None = None, *, dtypes: Sequence[str] | None = None,
        keyword: str | None = None, xfails: Sequence[str] = (), device: str = "cpu",
        junit_path: str | Path | None = None, json_path: str | Path | None = None,
        on_total: Callable[[int], None] | None = None,
        on_result: Callable[[Result], None] | None = None,
        on_start: Callable[[Case], None] | None = None) -> Report:
    """Run the suite on ``variants`` (None = all registered) and return the ``Report``.

    Bad selections (unknown variant, unknown dtype, an expected failure without a reason, a
    device this torch cannot use) raise ``ValueError`` / ``attnreg.UnknownVariantError`` before
    anything runs. Progress: ``on_total(n)`` first with the number of planned cases (again after
    collection when ``keyword`` deselects some), ``on_start(case)`` as each case starts,
    ``on_result(result)`` as each ends.
    """
    check_device(device)
    specs = select_specs(variants)
    names = [s.name for s in specs]
    subjects = [label for s in specs
                for label in (s.name, *(config_label(s.name, c) for c in s.check_configs))]
    for d in dtypes or ():
        parse_dtype(d)
    parse_xfail(xfails)
    if on_total:  # known before pytest starts (cheap: no module is built), so a bar counts at once
        on_total(len(build_cases(names, dtypes=dtypes, xfails=xfails, device=device)))
    recorder = _Recorder(on_total, on_result, on_start)
    start = time.perf_counter()
    saved_addopts = os.environ.pop("PYTEST_ADDOPTS", None)
    try:
        with tempfile.TemporaryDirectory(prefix="attnreg-check-") as tmp:
            ini = Path(tmp, "pytest.ini")
            ini.write_text("[pytest]\n", encoding="utf-8")
            args = ["-c", str(ini), "--rootdir", tmp, "-p", "no:cacheprovider", "-p", "no:terminal",
                    "-p", "no:randomly", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                    f"--attnreg-variants={','.join(names)}", f"--attnreg-device={device}"]
            if not _plugin_autoloads():
                args += ["-p", PLUGIN_MODULE]
            if dtypes:
                args.append(f"--attnreg-dtypes={','.join(dtypes)}")
            args += [f"--attnreg-xfail={x}" for x in xfails]
            if keyword:
                args += ["-k", keyword]
            if junit_path:
                args += ["--junitxml", str(Path(junit_path).resolve())]
            code = pytest.main([*args, tmp], plugins=[recorder])
    finally:
        if saved_addopts is not None:
            os.environ["PYTEST_ADDOPTS"] = saved_addopts
    report = Report(names, list(recorder.results.values()), recorder.errors,
                    time.perf_counter() - start, int(code), subjects)
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return report
