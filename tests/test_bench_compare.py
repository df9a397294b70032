"""The speed guard's logic on synthetic results documents (deterministic: no timing here), the
feasibility guard shared with the pytest-benchmark cases, and the CI preset's shape."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from attnreg.bench import (
    CI_PRESET,
    BenchSettings,
    GuardSettings,
    Job,
    ProbeResult,
    ci_choices,
    ci_settings,
    compare_runs,
)
from attnreg.bench.feasibility import Feasibility
from attnreg.core import ConfigError

MB = 2**20


def _point(series: str, length: int, t: float, peak: int, speedup: float | None = None,
           kind: str = "variant", mode: str = "fwd", causal: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {"series": series, "kind": kind, "mode": mode, "causal": causal, "length": length,
                         "status": "ok", "time": {"median_s": t}, "memory": {"peak_bytes": peak}}
    if speedup is not None:
        p["speedup"] = {"sdpa": speedup}
    return p


def _doc(local_speedup: float = 10.0, local_peak: int = 40 * MB, length: int = 4096) -> dict[str, Any]:
    settings = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32", "threads": 2}
    return {
        "schema": "attnreg-bench/1", "settings": settings,
        "variants": {"local(window=256)": {"config": {"variant": "local", "window": 256}}},
        "points": [
            _point("sdpa", length, 1.0, 30 * MB, kind="sdpa"),
            _point("local(window=256)", length, 1.0 / local_speedup, local_peak, local_speedup),
            _point("local(window=256)", 512, 0.1, 2 * MB, 0.5),  # short: shown, never gated
        ],
    }


def test_noise_within_the_factor_passes_and_short_points_are_not_gated() -> None:
    now = _doc(local_speedup=10.0 / 1.4, local_peak=int(40 * MB * 1.4))
    now["points"][2]["speedup"]["sdpa"] = 0.01  # 50x worse, but at L=512
    result = compare_runs(now, _doc())
    assert result.ok, result.as_json()
    gated = [c for c in result.changes if c.gated]
    assert len(gated) == 1 and gated[0].speedup_change == pytest.approx(1 / 1.4)
    assert [c.gated for c in result.changes if c.length == 512] == [False]
    assert result.as_json()["speedup_change_range"] == [pytest.approx(1 / 1.4)] * 2


def test_a_speedup_falling_by_more_than_the_factor_fails() -> None:
    result = compare_runs(_doc(local_speedup=10.0 / 1.6), _doc())
    assert not result.ok
    (reg,) = result.regressions
    assert "speedup over SDPA fell 1.60x" in reg.problems[0]
    assert result.as_json()["status"] == "fail"
    assert compare_runs(_doc(local_speedup=10.0 / 1.6), _doc(), GuardSettings(max_slowdown=2.0)).ok


def test_memory_growth_fails_above_the_floor_only() -> None:
    result = compare_runs(_doc(local_peak=80 * MB), _doc())
    assert not result.ok and "peak memory grew 2.00x" in result.regressions[0].problems[0]
    # 1 MB -> 3 MB is page-granularity noise: below the 4 MB floor, not a regression.
    assert compare_runs(_doc(local_peak=3 * MB), _doc(local_peak=1 * MB)).ok


def test_a_gated_point_that_could_not_be_measured_now_fails() -> None:
    now = _doc()
    now["points"][1].update(status="skipped", reason="estimated 40 s per call > per-point budget 20 s")
    result = compare_runs(now, _doc())
    assert not result.ok and "not measured in this run (skipped" in result.regressions[0].problems[0]
    now = _doc()
    del now["points"][1]["speedup"]  # no SDPA point in this run to compare with
    assert "no dense SDPA time" in compare_runs(now, _doc()).regressions[0].problems[0]
    now = _doc()
    del now["points"][1]["memory"]
    assert "peak memory not measured" in compare_runs(now, _doc()).regressions[0].problems[0]


def test_unplanned_points_and_changed_configs_are_listed_not_compared() -> None:
    now = _doc()
    now["points"] = [p for p in now["points"] if p["length"] != 512]
    result = compare_runs(now, _doc())
    assert result.ok and any("L=512: not planned" in line for line in result.not_compared)
    changed = copy.deepcopy(_doc(local_speedup=1.0))
    changed["variants"]["local(window=256)"]["config"]["window"] = 128
    result = compare_runs(changed, _doc())
    assert not result.changes and all("config differs" in x for x in result.not_compared)
    assert not result.ok and result.as_json()["reason"] == "no gated point was compared"
    assert any("window: 256 -> 128" in x for x in result.not_compared)


def test_a_changed_config_in_the_same_preset_fails_until_the_baseline_is_refreshed() -> None:
    """A preset point whose variant config changed (e.g. a new default) measures something else
    than its baseline: the guard fails and says to refresh, instead of silently not comparing."""
    base, now = _doc(), _doc()
    for d in (base, now):
        d["settings"]["preset"] = "ci"
    base["variants"]["local(window=256)"]["config"]["eps"] = 1e-6
    now["variants"]["local(window=256)"]["config"]["eps"] = None
    result = compare_runs(now, base)
    (reg,) = result.regressions  # the short point (L=512, not gated) is only listed
    assert reg.length == 4096 and "config changed (eps: 1e-06 -> None)" in reg.problems[0]
    assert "refresh the baseline" in reg.problems[0] and not result.ok
    assert any("L=512: the variant's config differs" in x for x in result.not_compared)


def test_a_preset_that_lost_a_gated_point_fails() -> None:
    base, now = _doc(), _doc()
    for d in (base, now):
        d["settings"]["preset"] = "ci"
    now["points"] = [p for p in now["points"] if p["length"] != 4096 or p["kind"] != "variant"]
    now["points"].append(_point("bigbird", 4096, 0.1, 40 * MB, 10.0))
    base["points"].append(_point("bigbird", 4096, 0.1, 40 * MB, 10.0))
    result = compare_runs(now, base)
    (reg,) = result.regressions
    assert reg.series == "local(window=256)" and "no longer measures this point" in reg.problems[0]


def test_paired_speedups_are_preferred_and_must_match_in_kind() -> None:
    base, now = _doc(), _doc(local_speedup=2.0)  # separately timed SDPA says 5x slower ...
    for d, paired in ((base, 10.0), (now, 9.0)):
        d["points"][1]["speedup"]["sdpa_paired"] = paired  # ... the paired timing says 10% slower
    assert compare_runs(now, base).ok
    del now["points"][1]["speedup"]["sdpa_paired"]
    (reg,) = compare_runs(now, base).regressions
    assert "not comparable" in reg.problems[0]


def test_runs_with_other_settings_are_refused() -> None:
    now = _doc()
    now["settings"]["threads"] = 1
    with pytest.raises(ConfigError, match="threads: baseline 2, this run 1"):
        compare_runs(now, _doc())
    with pytest.raises(ConfigError, match="must be > 1"):
        GuardSettings(max_slowdown=1.0)


class _FakeProber:
    """Answers calibration calls with a quadratic series (1 MB and 1 ms at L=512); records calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, job: Job, target_s: float, slow_s: float, repeat: bool = True,
            max_call_s: float | None = None) -> ProbeResult:
        self.calls.append(job.length)
        r = (job.length / 512) ** 2
        return ProbeResult("ok", samples=[1e-3 * r], peak_bytes=int(MB * r), input_bytes=0)


def test_feasibility_skips_a_point_that_cannot_fit_without_running_it() -> None:
    settings = BenchSettings(lengths=(65536,), max_memory=4 * 2**30, max_baseline_call_s=20.0)
    prober = _FakeProber()
    feasible = Feasibility(settings, prober)  # type: ignore[arg-type]
    job = Job("baseline", 65536, 1, 8, 64, "float32", baseline="naive")
    est = feasible.check(("additive:naive", "fwd", False), job)
    assert prober.calls == [8192, 16384]  # two small calibration calls, never the point itself
    assert est.skip is not None and "> --max-memory 4.0 GiB" in est.skip
    assert est.bytes == pytest.approx(16 * 2**30 * (65536 / 16384) ** 2 / 16, rel=1e-9)
    # Larger lengths of a ruled-out series are skipped with the same reason, with no new call.
    again = feasible.check(("additive:naive", "fwd", False), job.at_length(131072))
    assert again.skip is not None and "at L=65536" in again.skip and len(prober.calls) == 2
    # Another (mode, causal) of the same series has its own history.
    assert feasible.check(("additive:naive", "fwdbwd", False), job).skip is not None


def test_ci_preset_plans_only_its_points_at_fast_path_lengths() -> None:
    settings = ci_settings()
    assert settings.threads == 1 and settings.paired and not settings.baselines and settings.preset == "ci"
    choices = {c.label: c for c in ci_choices(settings)}
    assert set(choices) == {"local(window=256)", "bigbird", "linear", "additive"}
    local = choices["local(window=256)"]
    assert local.wants("fwd", True, 8192) and local.wants("fwdbwd", True, 4096)
    assert not local.wants("fwdbwd", False, 4096) and not local.wants("fwd", False, 8192)
    assert min(n for e in CI_PRESET for n in e.lengths) >= 2048
    assert all(n >= GuardSettings().min_length for c in choices.values() for _, _, n in c.only or ())


def test_best_of_keeps_the_faster_measurement_of_each_point() -> None:
    from attnreg.bench import best_of

    disturbed = _doc(local_speedup=5.0)
    again = _doc(local_speedup=9.0)
    again["points"] = [p for p in again["points"] if p["length"] == 4096]
    merged = best_of(disturbed, again)
    assert compare_runs(disturbed, _doc()).regressions and compare_runs(merged, _doc()).ok
    assert [p.get("confirmation", False) for p in merged["points"]] == [False, True, False]
    # A real regression stays one: the confirmation is no faster.
    assert not compare_runs(best_of(disturbed, _doc(local_speedup=4.0)), _doc()).ok
