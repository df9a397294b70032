"""Whether a point can be measured: memory and time estimated from the same series' smaller
lengths, so that a point that cannot fit is skipped with the reason instead of failing.

One ``Feasibility`` serves ``attnreg bench`` and the pytest-benchmark cases under
``benchmarks/``: both skip exactly the same points for the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import extrapolate, median
from .cases import Job
from .probe import Prober, ProbeResult
from .settings import BenchSettings

__all__ = ["CALIBRATE_ABOVE", "Estimate", "Feasibility", "SeriesKey"]

CALIBRATE_ABOVE = 1024  # below this a point is cheap and the watchdog alone is a sufficient guard
SeriesKey = tuple[str, str, bool]  # (series, mode, causal)


@dataclass(frozen=True)
class Estimate:
    """A point's extrapolated needs, and why it must be skipped (None: measure it)."""

    bytes: float | None
    call_s: float | None
    skip: str | None = None

    def as_json(self) -> dict[str, float | None]:
        """Plain-JSON form (``estimate`` of a point)."""
        return {"bytes": self.bytes, "call_s": self.call_s}


class Feasibility:
    """Per-series history of measured (length, bytes, seconds) and the lengths ruled out.

    Keyed by (series, mode, causal): a forward point must not be extrapolated from, or skipped
    because of, the same series' forward+backward points.
    """

    def __init__(self, settings: BenchSettings, prober: Prober) -> None:
        self.s = settings
        self.prober = prober
        self.history: dict[SeriesKey, list[tuple[int, float, float]]] = {}
        self.dead: dict[SeriesKey, str] = {}  # why larger lengths of a series are skipped

    def budget(self, job: Job) -> float:
        """The per-call time budget of ``job``: variants and baselines have their own."""
        return self.s.max_call_s if job.kind == "variant" else self.s.max_baseline_call_s

    def estimate(self, key: SeriesKey, length: int) -> tuple[float | None, float | None]:
        """(bytes, seconds per call) at ``length`` from the series' measured lengths."""
        history = self.history.get(key, [])
        return (extrapolate([(n, b) for n, b, _ in history], length, 1.0, 2.5, floor=2**20),
                extrapolate([(n, t) for n, _, t in history], length, 1.0, 3.0, floor=1e-4))

    def check(self, key: SeriesKey, job: Job) -> Estimate:
        """Estimate ``job`` (calibrating at two small lengths first when the series has fewer
        than two measured lengths and the point is long or looks too big) and decide."""
        if key in self.dead:
            return Estimate(None, None, self.dead[key])
        s, budget = self.s, self.budget(job)
        history = self.history.setdefault(key, [])
        est_mem, est_time = self.estimate(key, job.length)
        over = (est_mem or 0) > s.max_memory or (est_time or 0) > budget
        # Fewer than two measured lengths: the slope is a guess. Measure two small lengths first
        # (one call each) for long points, and before skipping on a one-point extrapolation.
        if len(history) < 2 and (job.length > CALIBRATE_ABOVE or over):
            for n in sorted({max(8, job.length // 8), max(16, job.length // 4)} - {h[0] for h in history}):
                cal = self.prober.run(job.at_length(n), s.target_s, s.slow_s, repeat=False)
                if cal.status == "ok" and cal.total_bytes is not None and cal.samples:
                    history.append((n, float(cal.total_bytes), median(cal.samples)))
            est_mem, est_time = self.estimate(key, job.length)
        reason = None
        if est_mem is not None and est_mem > s.max_memory:
            reason = (f"estimated {est_mem / 2**30:.1f} GiB > --max-memory "
                      f"{s.max_memory / 2**30:.1f} GiB")
        elif est_time is not None and est_time > budget and s.skip_by_time_estimate:
            reason = f"estimated {est_time:.0f} s per call > per-point budget {budget:g} s"
        if reason is not None:
            self.rule_out(key, reason, job.length)
        return Estimate(est_mem, est_time, reason)

    def record(self, key: SeriesKey, length: int, result: ProbeResult) -> None:
        """Add a measured point to its series' history."""
        if result.status == "ok" and result.total_bytes is not None and result.samples:
            self.history.setdefault(key, []).append((length, float(result.total_bytes),
                                                     median(result.samples)))

    def rule_out(self, key: SeriesKey, reason: str, length: int) -> None:
        """Skip this and every larger length of the series, with ``reason``."""
        self.dead[key] = f"{reason} at L={length}"
