"""Unit tests of the benchmark harness logic (no timing targets: those live in benchmarks/)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

import attnreg
from attnreg.bench import (
    BenchSettings,
    Job,
    Prober,
    ProbeResult,
    crossover,
    derive,
    extrapolate,
    fit_exponent,
    parse_lengths,
    parse_variant,
    run_bench,
    run_gate,
)
from attnreg.bench.settings import parse_bytes
from attnreg.core import AttentionConfig, ConfigError, VariantSpec
from attnreg.plugins.dot_product import DotProductAttention


# -- analysis -----------------------------------------------------------------------------------
def test_fit_exponent_recovers_power_law_and_respects_min_x() -> None:
    pts = [(n, 3.0 * n**1.5) for n in (512, 1024, 2048, 4096)]
    fit = fit_exponent(pts)
    assert fit is not None and abs(fit["exponent"] - 1.5) < 1e-12 and fit["r2"] > 0.999999
    # A constant-dominated head (small L) must not bias the fit over the tail.
    noisy = [(256, 1.0), (512, 1.0)] + [(n, n**2 / 1e6) for n in (4096, 8192, 16384)]
    assert abs(fit_exponent(noisy, min_x=4096)["exponent"] - 2.0) < 1e-12
    assert fit_exponent(noisy, min_x=4096)["x_min"] == 4096
    assert fit_exponent([(1024, 1.0)]) is None
    assert fit_exponent([(1024, 1.0), (1024, 2.0)]) is None
    # Two lengths always fit a line exactly: no exponent from them (bench --quick measures two).
    assert fit_exponent([(32, 1.0), (64, 32.0)]) is None
    assert fit_exponent([(32, 1.0), (64, 32.0)], min_points=2)["exponent"] == pytest.approx(5.0)
    assert fit_exponent([(32, 1.0), (64, 2.0), (64, 2.1)]) is None  # distinct lengths count


def test_extrapolate_clamps_the_slope() -> None:
    hist = [(1024, 10.0), (2048, 20.0)]
    assert extrapolate(hist, 8192, 1.0, 2.5) == pytest.approx(80.0)
    steep = [(1024, 1.0), (2048, 64.0)]  # slope 6 -> clamped to 2.5
    assert extrapolate(steep, 4096, 1.0, 2.5) == pytest.approx(64.0 * 2**2.5)
    assert extrapolate([(1024, 5.0)], 2048, 1.0, 2.0) == pytest.approx(20.0)  # one point: pessimistic
    assert extrapolate([], 2048, 1.0, 2.0) is None
    assert extrapolate([(4096, 1.0)], 2048, 1.0, 2.0) is None  # only larger points: no estimate


def test_crossover_interpolates_in_log_log() -> None:
    c = crossover([(1024, 0.5), (4096, 2.0), (16384, 8.0)])
    assert c["kind"] == "interpolated" and c["length"] == pytest.approx(2048.0)
    assert crossover([(1024, 1.5), (2048, 3.0)]) == {"length": 1024.0, "kind": "always"}
    assert crossover([(1024, 2.0), (2048, 0.9)])["kind"] == "never"
    # Faster, then slower, then faster again: the crossover is where it STAYS faster.
    c = crossover([(1024, 2.0), (2048, 0.5), (4096, 2.0)])
    assert c["kind"] == "interpolated" and c["length"] == pytest.approx(math.sqrt(2048 * 4096))


def test_parsers_give_clear_errors() -> None:
    assert parse_lengths("4K, 1024,1k") == (1024, 4096)
    assert parse_bytes("1.5G") == int(1.5 * 2**30) and parse_bytes("512M") == 512 * 2**20
    with pytest.raises(ConfigError, match="--lengths"):
        parse_lengths("10,abc")
    with pytest.raises(ConfigError, match="--max-memory"):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match="--modes"):
        BenchSettings(modes=("fwd", "bwd"))
    choice = parse_variant("sdpa:dropout=0.0,scale=0.5", 8, 64)
    assert choice.spec.name == "dot_product" and choice.config.scale == 0.5
    assert choice.label == "sdpa(dropout=0.0,scale=0.5)"
    with pytest.raises(ConfigError, match="field=value"):
        parse_variant("dot_product:scale", 8, 64)
    capped = parse_variant("sdpa:scale=0.5@2K", 8, 64)
    assert capped.max_length == 2048 and capped.config.scale == 0.5 and capped.label == "sdpa(scale=0.5)"
    with pytest.raises(ConfigError, match="MAXLEN"):
        parse_variant("sdpa@big", 8, 64)


# -- a deliberately wrong variant ---------------------------------------------------------------
class WrongConfig(AttentionConfig):
    variant: Literal["wrong_bench"] = Field("wrong_bench", description="name")


class WrongAttention(DotProductAttention):
    """Dot-product attention whose forward is off by 1% above ``correct_up_to`` tokens:
    attention_weights @ V disagrees there."""

    variant = "wrong_bench"
    correct_up_to = 0

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                masks: Any) -> torch.Tensor:
        out = super()._attend(query, key, value, masks)  # (B, H, L, Ev)
        return out * 1.01 if query.shape[2] > self.correct_up_to else out


@pytest.fixture
def wrong_variant() -> Any:
    spec = VariantSpec(name="wrong_bench", config=WrongConfig, factory=WrongAttention,
                       capabilities=WrongAttention.capabilities, summary="wrong on purpose",
                       reference="none")
    attnreg.register(spec)
    yield spec
    attnreg.unregister("wrong_bench")


def test_gate_accepts_sdpa_and_rejects_a_wrong_variant(wrong_variant: Any) -> None:
    good = run_gate(parse_variant("dot_product", 2, 8), 1, 2, 8, 40, "float32", (False, True), True)
    assert good.ok and good.errors["float64/full"] < 1e-12 and good.errors["float32/causal"] < 1e-5
    bad = run_gate(parse_variant("wrong_bench", 2, 8), 1, 2, 8, 40, "float32", (False,), False)
    assert not bad.ok and "float64 forward differs" in (bad.reason or "")
    assert bad.errors["float64/full"] == pytest.approx(0.01, rel=1e-6)


class LongWrongConfig(AttentionConfig):
    variant: Literal["long_wrong_bench"] = Field("long_wrong_bench", description="name")


class LongWrongAttention(WrongAttention):
    """Correct up to L=512; a broken "fast path" above (1% off)."""

    variant = "long_wrong_bench"
    correct_up_to = 512


def test_gate_catches_a_variant_wrong_only_on_long_inputs() -> None:
    spec = VariantSpec(name="long_wrong_bench", config=LongWrongConfig, factory=LongWrongAttention,
                       capabilities=LongWrongAttention.capabilities, summary="wrong above L=512",
                       reference="none")
    attnreg.register(spec)
    try:
        choice = parse_variant("long_wrong_bench", 2, 8)
        short = run_gate(choice, 1, 2, 8, 300, "float32", (False, True), False)
        assert short.ok  # the small gate alone cannot see it
        settings = BenchSettings(lengths=(512, 1024, 4096))
        assert settings.long_gate_length == 2048  # longest benchmarked length, capped
        gate = run_gate(choice, 1, 2, 8, settings.gate_length, "float32", (False, True), False,
                        long_length=settings.long_gate_length)
        assert not gate.ok and "at L=2048" in (gate.reason or "") and "float64 forward differs" in gate.reason
        assert gate.errors["L=2048/float64/full"] == pytest.approx(0.01, rel=1e-6)
        assert BenchSettings(lengths=(64, 128)).long_gate_length is None  # not longer than gate_length
        assert run_gate(parse_variant("dot_product", 2, 8), 1, 2, 8, 40, "float32", (False, True), False,
                        long_length=700).ok
    finally:
        attnreg.unregister("long_wrong_bench")


class FakeProber:
    """Memory grows like L^2 and time like L^2: deterministic, no processes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def run(self, job: Job, target_s: float, slow_s: float, repeat: bool = True,
            max_call_s: float | None = None) -> ProbeResult:
        self.calls.append((job.kind, job.length))
        t = 1e-3 * (job.length / 64) ** 2
        return ProbeResult("ok", samples=[t, t, t], first_s=t, warmup=True,
                           peak_bytes=1000 * job.length**2, input_bytes=0)


def _quick(**kw: Any) -> BenchSettings:
    return BenchSettings.quick_settings(modes=("fwd",), causal=False, **kw)


def test_failed_variant_is_reported_and_never_timed(wrong_variant: Any) -> None:
    s = _quick(lengths=(64, 128, 256))
    fake = FakeProber()
    names = ("wrong_bench", "dot_product@128")
    doc = run_bench(s, [parse_variant(n, s.heads, s.head_dim) for n in names], prober=fake)  # type: ignore[arg-type]
    assert doc["variants"]["wrong_bench"]["status"] == "failed"
    assert doc["variants"]["dot_product"]["status"] == "passed"
    assert {p["series"] for p in doc["points"]} == {"sdpa", "dot_product"}
    assert max(p["length"] for p in doc["points"]) == 128  # dot_product@128: nothing planned above
    assert ("variant", 64) in fake.calls and len([c for c in fake.calls if c[0] == "variant"]) == 2
    sp = [p["speedup"]["sdpa"] for p in doc["points"] if p["kind"] == "variant"]
    assert sp == [pytest.approx(1.0), pytest.approx(1.0)]


def test_memory_and_time_estimates_skip_points_with_reason() -> None:
    s = _quick(lengths=(64, 128, 256, 512), max_memory=1000 * 200**2)  # 1000 * 256^2 is over
    fake = FakeProber()
    doc = run_bench(s, [parse_variant("dot_product", s.heads, s.head_dim)], prober=fake)  # type: ignore[arg-type]
    by_len = {p["length"]: p for p in doc["points"] if p["series"] == "dot_product"}
    assert by_len[128]["status"] == "ok"
    assert by_len[256]["status"] == "skipped" and "--max-memory" in by_len[256]["reason"]
    assert by_len[256]["estimate"]["bytes"] == pytest.approx(1000 * 256**2)
    assert "at L=256" not in by_len[256]["reason"] and "at L=256" in by_len[512]["reason"]
    assert not {("variant", 256), ("variant", 512), ("sdpa", 256), ("sdpa", 512)} & set(fake.calls)
    # The baseline is only measured where a variant was: nothing to compare with otherwise.
    sdpa = {p["length"]: p for p in doc["points"] if p["series"] == "sdpa"}
    assert sdpa[128]["status"] == "ok" and "not needed" in sdpa[256]["reason"]
    s = _quick(lengths=(64, 128, 256), max_call_s=0.010, max_baseline_call_s=1.0)  # 4 ms at 128 -> 16 ms
    doc = run_bench(s, [parse_variant("dot_product", s.heads, s.head_dim)], prober=FakeProber())  # type: ignore[arg-type]
    skipped = [p for p in doc["points"] if p["status"] == "skipped"]
    assert [p["series"] for p in skipped] == ["dot_product", "sdpa"]
    assert "per-point budget 0.01 s" in skipped[0]["reason"] and skipped[0]["length"] == 256
    row = next(r for r in doc["summary"] if r["series"] == "dot_product")
    assert row["time_exponent"] is None  # two measured lengths (64, 128): no fit
    assert row["skipped"] == {"256": skipped[0]["reason"]}


def test_one_point_estimate_over_budget_calibrates_before_skipping() -> None:
    # From L=64 alone the pessimistic slope 2.5 predicts 741 MB at 512; the true slope is 2 (262 MB).
    s = _quick(lengths=(64, 512), max_memory=400 * 2**20)
    fake = FakeProber()
    doc = run_bench(s, [parse_variant("dot_product", s.heads, s.head_dim)], prober=fake)  # type: ignore[arg-type]
    p512 = next(p for p in doc["points"] if p["series"] == "dot_product" and p["length"] == 512)
    assert p512["status"] == "ok" and p512["estimate"]["bytes"] == pytest.approx(1000 * 512**2)
    assert ("variant", 128) in fake.calls and fake.calls.count(("variant", 64)) == 1


def test_time_limit_skips_the_rest_with_reason() -> None:
    s = _quick(lengths=(64, 128), time_limit_s=0.0)
    doc = run_bench(s, [parse_variant("dot_product", s.heads, s.head_dim)], prober=FakeProber())  # type: ignore[arg-type]
    assert doc["status"] == "complete" and doc["time_limit_reached"]
    assert doc["points"] and all("time limit" in p["reason"] for p in doc["points"])


def test_watchdog_kills_a_point_over_the_memory_budget() -> None:
    prober = Prober(threads=1, max_memory=48 * 2**20, max_call_s=30)
    res = prober.run(Job("gemm", 4096, 1, 1, 1, "float32"), 0.01, 1.0)  # 3 x 64 MiB
    assert res.status == "memory" and "--max-memory" in (res.reason or "")
    ok = prober.run(Job("sdpa", 256, 1, 2, 16, "float32", mode="fwdbwd"), 0.01, 1.0)
    assert ok.status == "ok" and ok.peak_bytes is not None and ok.samples and ok.warmup


def test_interrupt_leaves_partial_results(tmp_path: Path) -> None:
    s = _quick(lengths=(32, 64, 128))

    def progress(desc: str, done: int, total: int) -> None:
        if total and done == 3:
            raise KeyboardInterrupt

    doc = run_bench(s, [parse_variant("dot_product", s.heads, s.head_dim)], out=tmp_path,
                    progress=progress, prober=FakeProber())  # type: ignore[arg-type]
    from attnreg.bench import load_results

    saved = load_results(tmp_path / "results.json")
    assert doc["status"] == saved["status"] == "interrupted"
    assert len(saved["points"]) == 3 and saved["summary"]


def test_unpicklable_variant_is_timed_in_process_without_memory() -> None:
    spec = attnreg.get_variant("dot_product")
    s = _quick(lengths=(32,))
    choice = parse_variant("dot_product", s.heads, s.head_dim)
    local = type(choice)(label="local_factory", spec=VariantSpec(
        name="dot_product", config=spec.config, factory=lambda cfg: DotProductAttention(cfg),
        capabilities=spec.capabilities, summary="x", reference="x"), config=choice.config)
    doc = run_bench(s, [local])
    p = next(p for p in doc["points"] if p["series"] == "local_factory")
    assert p["status"] == "ok" and p["memory"]["peak_bytes"] is None and "memory not measured" in p["note"]
    assert derive(doc)["points"][0]["speedup"]["sdpa"] > 0  # variants first, then baselines


@pytest.mark.parametrize("variant", ["local", "bigbird"])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_baselines_compute_the_variant(variant: str, causal: bool) -> None:
    """Both dense baselines (float and bool mask) are the variant's own function, not just timed."""
    from attnreg.bench.cases import _attention_fn, make_inputs

    spec = attnreg.get_variant(variant)
    config = spec.config(window=5) if variant == "local" else spec.config(block_size=8, num_heads=2)
    outs = {}
    for kind in ("variant", "sdpa_masked", "sdpa_masked_bool"):
        job = Job(kind, 70, 1, 2, 8, "float32", "fwd", causal, factory=spec.factory, config=config)
        fn, _ = _attention_fn(job)
        outs[kind] = fn(*make_inputs(job, requires_grad=False))  # (B, H, L, Ev)
    for kind in ("sdpa_masked", "sdpa_masked_bool"):
        assert (outs[kind] - outs["variant"]).abs().max().item() <= 1e-5, kind


def test_timed_repeats_takes_at_least_three_samples_unless_slow() -> None:
    from attnreg.bench.probe import timed_repeats

    calls: list[int] = []
    samples, warm = timed_repeats(lambda: calls.append(1), first_s=1.0, target_s=0.5, slow_s=3.0)
    assert warm and len(samples) == len(calls) == 3
    samples, warm = timed_repeats(lambda: calls.append(1), first_s=0.001, target_s=0.01, slow_s=3.0)
    assert warm and len(samples) == 10
    samples, warm = timed_repeats(lambda: calls.append(1), first_s=5.0, target_s=0.5, slow_s=3.0)
    assert not warm and samples == [5.0]
