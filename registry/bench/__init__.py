"""attnreg.bench: one benchmark over every registered variant (see docs/benchmarks.md).

    from attnreg.bench import BenchSettings, parse_variant, run_bench
    s = BenchSettings(lengths=(1024, 4096), threads=2)
    doc = run_bench(s, [parse_variant("local:window=256", s.heads, s.head_dim)], out=Path("bench-out"))

The same measured calls (``cases.prepare``) back ``attnreg bench`` and the pytest-benchmark
cases under ``benchmarks/``.
"""

from __future__ import annotations

from pathlib import Path

from .analysis import crossover, extrapolate, fit_exponent
from .cases import Job, prepare
from .compare import Comparison, GuardSettings, best_of, compare_runs
from .derive import derive
from .gate import GateResult, run_gate
from .guard import run_guard
from .harness import SCHEMA, run_bench
from .presets import CI_BASELINE, CI_PRESET, ci_choices, ci_settings
from .probe import MEMORY_METHOD, Prober, ProbeResult
from .records import PointRecord, ResultsDoc, SettingsRecord
from .report import load_results, print_report
from .settings import BenchSettings, VariantChoice, parse_lengths, parse_variant

__all__ = [
    "CI_BASELINE",
    "CI_PRESET",
    "MEMORY_METHOD",
    "PointRecord",
    "ResultsDoc",
    "SCHEMA",
    "BenchSettings",
    "Comparison",
    "GateResult",
    "GuardSettings",
    "Job",
    "ProbeResult",
    "Prober",
    "SettingsRecord",
    "VariantChoice",
    "best_of",
    "ci_choices",
    "ci_settings",
    "compare_runs",
    "crossover",
    "derive",
    "extrapolate",
    "fit_exponent",
    "load_results",
    "parse_lengths",
    "parse_variant",
    "plot_results",
    "prepare",
    "print_report",
    "run_bench",
    "run_gate",
    "run_guard",
]


def plot_results(doc: ResultsDoc, out_dir: Path) -> list[Path]:
    """Write time.png and memory.png (imports matplotlib only when called)."""
    from .plots import plot_results as _plot

    return _plot(doc, out_dir)
