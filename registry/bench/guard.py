"""The speed guard as one call: compare a run with a baseline, confirm failing points by
measuring them once more, and keep the better measurement of each (see ``compare.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .compare import Comparison, GuardSettings, best_of, compare_runs
from .harness import Progress, run_bench
from .records import ResultsDoc
from .settings import BenchSettings, VariantChoice

__all__ = ["run_guard"]


def run_guard(doc: ResultsDoc, baseline: ResultsDoc, guard: GuardSettings, settings: BenchSettings,
              choices: list[VariantChoice], out: Path | None = None, progress: Progress | None = None,
              notify: Callable[[str], None] | None = None) -> Comparison:
    """``compare_runs(doc, baseline)``; where it finds regressions, the failing points are measured
    again (into ``out/confirm``) and the comparison is redone on the better of both measurements."""
    comparison = compare_runs(doc, baseline, guard)
    if comparison.ok:
        return comparison
    failing = {(c.series, c.mode, c.causal, c.length) for c in comparison.regressions}
    if notify is not None:
        notify(f"{len(failing)} point(s) beyond the limits; measuring them again to confirm")
    again = [replace(c, only=frozenset((m, k, n) for s, m, k, n in failing if s == c.label))
             for c in choices if any(s == c.label for s, *_ in failing)]
    second = run_bench(settings, again, out=None if out is None else out / "confirm", progress=progress)
    return compare_runs(best_of(doc, second), baseline, guard)
