"""The speed guard: compare a run with a baseline run, point by point, on ratios.

Absolute times move by tens of percent between runs on a shared machine; a variant's speedup
over dense SDPA measured in the same run moves much less (both sides see the same machine).
So the guard compares, for every variant point both runs measured:

- the speedup over the run's own dense SDPA: ``change = speedup_now / speedup_before``; a fall
  by more than ``max_slowdown`` (``change < 1 / max_slowdown``) is a regression. Where the run
  timed each variant point alternately with SDPA in one process (``paired``, the CI preset), the
  speedup is the median of the per-pair ratios (``sdpa_paired``); both runs must use the same kind;
- the peak memory of the call (a fresh process's peak RSS, which does not depend on the
  machine's load): ``growth = peak_now / peak_before``; above ``max_memory_growth`` is a
  regression, unless both are below ``memory_floor`` (page-granularity noise).

Only points at ``length >= min_length`` are gated: below it the fast paths have not started
(local's window of 256 is dense at L=512) and per-call overheads dominate the ratio. A gated
baseline point that the new run planned but could not measure (skipped by the guards, failed)
is a regression too: a variant that became too slow to measure must not pass silently. So is a
gated baseline point that the same preset no longer plans, and a comparison that gated nothing.

A regression is confirmed before it fails a run: the CLI measures just the failing points once
more and keeps, per point, the better of the two measurements (``best_of``). One disturbed
measurement on a shared machine then does not fail CI; a real slowdown fails both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.markup import escape
from rich.table import Table

from attnreg.core import ConfigError

from .derive import point_key
from .records import PointRecord, ResultsDoc

__all__ = ["COMPARABLE_SETTINGS", "Comparison", "GuardSettings", "PointChange", "best_of", "compare_runs",
           "sdpa_speedup"]

# Settings that change what a ratio means: runs that differ in them are not comparable.
COMPARABLE_SETTINGS = ("batch", "heads", "head_dim", "dtype", "threads")


@dataclass(frozen=True)
class GuardSettings:
    """Thresholds of the speed guard (``attnreg bench --compare``)."""

    max_slowdown: float = 1.5
    max_memory_growth: float = 1.5
    min_length: int = 2048
    memory_floor: int = 4 * 2**20

    def __post_init__(self) -> None:
        if not self.max_slowdown > 1 or not self.max_memory_growth > 1:
            raise ConfigError(f"--max-slowdown and --max-memory-growth must be > 1, got "
                              f"{self.max_slowdown} and {self.max_memory_growth}")
        if self.min_length < 1 or self.memory_floor < 0:
            raise ConfigError("--guard-from must be >= 1 and the memory floor >= 0")


@dataclass
class PointChange:
    """One variant point of both runs: its speedup over SDPA and its peak memory, before/now."""

    series: str
    mode: str
    causal: bool
    length: int
    gated: bool
    speedup_before: float | None = None
    speedup_now: float | None = None
    memory_before: int | None = None
    memory_now: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def speedup_change(self) -> float | None:
        """speedup now / before (< 1: the variant lost ground against SDPA)."""
        if not self.speedup_before or not self.speedup_now:
            return None
        return self.speedup_now / self.speedup_before

    @property
    def memory_growth(self) -> float | None:
        """peak memory now / before."""
        if not self.memory_before or not self.memory_now:
            return None
        return self.memory_now / self.memory_before

    def as_json(self) -> dict[str, Any]:
        """Plain-JSON form, with the derived ratios."""
        return {**asdict(self), "speedup_change": self.speedup_change, "memory_growth": self.memory_growth}


@dataclass
class Comparison:
    """Every compared point, the points that could not be compared, and the verdict."""

    guard: GuardSettings
    changes: list[PointChange]
    not_compared: list[str]

    @property
    def regressions(self) -> list[PointChange]:
        """Gated points with a problem."""
        return [c for c in self.changes if c.gated and c.problems]

    @property
    def ok(self) -> bool:
        """Whether the guard passes: no regression, and at least one gated point compared."""
        return not self.regressions and any(c.gated for c in self.changes)

    def as_json(self) -> dict[str, Any]:
        """The ``compare.json`` document."""
        spread = [c.speedup_change for c in self.changes if c.gated and c.speedup_change]
        return {
            "status": "pass" if self.ok else "fail",
            "reason": None if self.ok or self.regressions else "no gated point was compared",
            "guard": asdict(self.guard),
            "gated_points": sum(c.gated for c in self.changes),
            "speedup_change_range": [min(spread), max(spread)] if spread else None,
            "regressions": [c.as_json() for c in self.regressions],
            "changes": [c.as_json() for c in self.changes],
            "not_compared": self.not_compared,
        }

    def table(self) -> Table:
        """A rich table: one row per compared point."""
        g = self.guard
        table = Table(title=f"speed guard against the baseline (speedup over this run's dense SDPA; "
                            f"gated from L={g.min_length}: fail below 1/{g.max_slowdown:g} speedup change "
                            f"or above {g.max_memory_growth:g}x memory)")
        for col in ("series", "mode", "L", "vs SDPA before", "now", "change", "peak MB before", "now",
                    "growth", "verdict"):
            table.add_column(col, justify="left" if col in ("series", "mode", "verdict") else "right")
        for c in self.changes:
            verdict = ("[red]REGRESSION[/]: " + escape("; ".join(c.problems)) if c.gated and c.problems
                       else "ok" if c.gated else "[dim]not gated (short)[/]")
            table.add_row(escape(c.series), c.mode + (" causal" if c.causal else ""), str(c.length),
                          _x(c.speedup_before), _x(c.speedup_now), _r(c.speedup_change),
                          _mb(c.memory_before), _mb(c.memory_now), _r(c.memory_growth), verdict)
        return table


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _check_comparable(doc: ResultsDoc, baseline: ResultsDoc) -> None:
    now, before = doc.get("settings", {}), baseline.get("settings", {})
    diff = [f"{k}: baseline {before.get(k)!r}, this run {now.get(k)!r}" for k in COMPARABLE_SETTINGS
            if before.get(k) != now.get(k)]
    if diff:
        raise ConfigError("the baseline was measured with other settings, its ratios are not "
                          "comparable (" + "; ".join(diff) + "): run with the baseline's settings "
                          "or refresh the baseline")


def compare_runs(doc: ResultsDoc, baseline: ResultsDoc,
                 guard: GuardSettings | None = None) -> Comparison:
    """Compare the variant points of ``doc`` with those of ``baseline`` (see the module doc)."""
    guard = guard or GuardSettings()
    _check_comparable(doc, baseline)
    now = {point_key(p): p for p in doc.get("points", []) if p.get("kind") == "variant"}
    preset = doc.get("settings", {}).get("preset")
    same_preset = preset is not None and preset == baseline.get("settings", {}).get("preset")
    changes, not_compared = [], []
    for old in baseline.get("points", []):
        if old.get("kind") != "variant" or old.get("status") != "ok":
            continue
        key = point_key(old)
        series, mode, causal, length = key
        label = f"{series} {mode}{' causal' if causal else ''} L={length}"
        new = now.get(key)
        gated = length >= guard.min_length
        kind, before = sdpa_speedup(old)
        cfg_old = baseline.get("variants", {}).get(series, {}).get("config")
        cfg_new = doc.get("variants", {}).get(series, {}).get("config")
        if new is None:
            stale, skip = f"the {preset!r} preset no longer measures this point: ", "not planned in this run"
        elif cfg_old != cfg_new:  # e.g. a changed default
            diff = _config_diff(cfg_old, cfg_new)
            stale = f"the variant's config changed ({diff}): the baseline measured another configuration; "
            skip = f"the variant's config differs ({diff})"
        else:
            stale = skip = ""
        if stale and same_preset and gated:  # the same preset must measure what its baseline did
            c = PointChange(series, mode, causal, length, True, speedup_before=before)
            c.problems.append(stale + "refresh the baseline")
            changes.append(c)
            continue
        if skip:
            not_compared.append(f"{label}: {skip}")
            continue
        assert new is not None
        c = PointChange(series, mode, causal, length, gated=gated, speedup_before=before,
                        memory_before=(old.get("memory") or {}).get("peak_bytes"))
        if new.get("status") != "ok":
            c.problems.append(f"not measured in this run ({new.get('status')}: {new.get('reason')})")
        else:
            kind_now, c.speedup_now = sdpa_speedup(new)
            c.memory_now = (new.get("memory") or {}).get("peak_bytes")
            if kind_now is not None and kind is not None and kind_now != kind:
                c.speedup_now = None
                c.problems.append(f"speedup timed as {kind_now!r} now, {kind!r} in the baseline: not "
                                  "comparable (use the baseline's settings or refresh it)")
            _judge(c, guard)
        changes.append(c)
    return Comparison(guard, changes, not_compared)


def _config_diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """The fields that differ, as ``field: old -> new``."""
    old, new = old or {}, new or {}
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def sdpa_speedup(p: PointRecord) -> tuple[str | None, float | None]:
    """(kind, value) of a point's speedup over dense SDPA: paired timing where measured."""
    sp = p.get("speedup", {})
    for kind in ("sdpa_paired", "sdpa"):
        if sp.get(kind):
            return kind, sp[kind]
    return None, None


def _judge(c: PointChange, guard: GuardSettings) -> None:
    if c.speedup_before and not c.speedup_now and not c.problems:
        c.problems.append("no dense SDPA time to compare with in this run")
    if c.memory_before and c.memory_now is None:
        c.problems.append("peak memory not measured in this run")
    change = c.speedup_change
    if change is not None and change < 1.0 / guard.max_slowdown:
        c.problems.append(f"speedup over SDPA fell {1 / change:.2f}x "
                          f"({c.speedup_before:.2f}x -> {c.speedup_now:.2f}x)")
    growth = c.memory_growth
    big = max(c.memory_before or 0, c.memory_now or 0) >= guard.memory_floor
    if growth is not None and big and growth > guard.max_memory_growth:
        c.problems.append(f"peak memory grew {growth:.2f}x "
                          f"({_mb(c.memory_before)} -> {_mb(c.memory_now)} MB)")


def best_of(doc: ResultsDoc, again: ResultsDoc) -> ResultsDoc:
    """``doc`` with each variant point replaced by ``again``'s measurement of it where that one has
    the higher speedup over SDPA (each speedup is from its own run's SDPA point)."""
    better: dict[tuple[str, str, bool, int], PointRecord] = {}
    for p in again.get("points", []):
        if p.get("kind") == "variant" and p.get("status") == "ok" and sdpa_speedup(p)[1]:
            better[point_key(p)] = p
    points = []
    for p in doc.get("points", []):
        alt = better.get(point_key(p)) if p.get("kind") == "variant" else None
        mine = sdpa_speedup(p)[1] if p.get("status") == "ok" else None
        use = alt is not None and (mine is None or (sdpa_speedup(alt)[1] or 0) > mine)
        points.append({**alt, "confirmation": True} if use else p)
    return {**doc, "points": points}
