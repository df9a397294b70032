"""The records of a benchmark run, as they stand in ``results.json`` (schema ``attnreg-bench/1``).

They are ``TypedDict``s: the document is plain JSON, written and read back as it is (older files,
``benchmarks/ci-baseline.json`` included, load unchanged); these types only say which keys a
record has and what they hold. Keys a record may lack (a skipped point has no ``time``) are in the
``total=False`` part.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "EstimateRecord", "GemmRecord", "MemoryRecord", "PairedRecord", "PointRecord", "ResultsDoc", "RoofRecord",
    "SettingsRecord", "SummaryRow", "TimeRecord", "VariantRecord",
]


class TimeRecord(TypedDict):
    """Timed repeats of one point (seconds per call)."""

    median_s: float
    iqr_s: float
    min_s: float
    repeats: int
    warmup_excluded: int
    samples_s: list[float]


class MemoryRecord(TypedDict, total=False):
    """Bytes of one point: the call's peak and its inputs; a decoding state's size (decode mode)."""

    peak_bytes: int | None
    input_bytes: int | None
    state_bytes: int


class PairedRecord(TypedDict):
    """Dense SDPA timed alternately with the point in one process (``paired`` runs)."""

    series: str
    samples_s: list[float]
    ratios: list[float]  # SDPA time / the point's time, pair by pair


class EstimateRecord(TypedDict):
    """The feasibility estimate a point was planned with."""

    bytes: float | None
    call_s: float | None


class _PointKey(TypedDict):
    series: str  # "local(window=256)", "sdpa", "sdpa_masked[local]", "linear:cumsum"
    mode: str  # "fwd", "fwdbwd" or "decode"
    causal: bool
    length: int


class PointRecord(_PointKey, total=False):
    """One measured (or skipped) point: a series at one (mode, causal, length)."""

    kind: str  # "variant", "sdpa", "baseline" or one of the masked SDPA kinds
    variant: str | None  # the variant label the point belongs to (None for plain SDPA)
    baseline: str  # the variant's own baseline, for kind "baseline"
    status: str  # "ok", "skipped" or "error"
    reason: str | None
    note: str
    estimate: EstimateRecord
    time: TimeRecord
    paired: PairedRecord
    memory: MemoryRecord
    flops: float
    # Derived (``derive``): recomputed from the raw numbers above.
    tokens_per_s: float
    gflops: float
    roof_ratio: float | None
    speedup: dict[str, float]  # over each reference series: "sdpa", "sdpa_paired", a baseline, ...
    # Written by ``best_of`` and ``median_baseline``.
    confirmation: bool
    baseline_of_runs: list[float]


class SettingsRecord(TypedDict, total=False):
    """``BenchSettings`` as stored (``BenchSettings.as_json``), plus the machine's CPU count."""

    lengths: list[int]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    threads: int
    modes: list[str]
    causal: bool | None
    max_memory: int
    max_call_s: float
    max_baseline_call_s: float
    target_s: float
    time_limit_s: float | None
    slow_s: float
    fit_min: int
    gate_length: int
    long_gate_max: int
    seed: int
    quick: bool
    baselines: bool
    roof: bool
    paired: bool
    skip_by_time_estimate: bool
    preset: str | None
    cpu_count: int | None


class VariantRecord(TypedDict, total=False):
    """One benchmarked variant: what it is, its gate, and which baselines it has."""

    name: str
    max_length: int | None
    config: dict[str, Any]
    capabilities: dict[str, Any]
    complexity: str
    status: str  # "passed", "failed" or "unsupported"
    reason: str | None
    gate: dict[str, Any]  # GateResult.as_json()
    pattern_mask: bool
    baselines: list[str]
    baselines_not_run: dict[str, str]
    flops: bool


class GemmRecord(TypedDict):
    """One timing of the dense GEMM roof."""

    n: int
    when: str  # "start" or "end"
    gflops: float
    median_s: float
    min_s: float


class RoofRecord(TypedDict, total=False):
    """The machine's dense GEMM roof (GFLOP/s), the best of its timings."""

    gemm: list[GemmRecord]
    gflops: float | None


class SummaryRow(TypedDict, total=False):
    """Per series (mode, causal): scaling exponents, crossovers, what was measured or skipped."""

    series: str
    kind: str
    variant: str | None
    mode: str
    causal: bool
    measured: list[int]
    skipped: dict[str, str | None]
    time_exponent: float | None
    memory_exponent: float | None
    # Variants only: where they overtake each reference ({"length": L* or None, "kind": ...}).
    crossover_vs_sdpa: dict[str, float | str | None]
    crossover_vs_sdpa_masked: dict[str, float | str | None]
    crossover_vs_sdpa_masked_bool: dict[str, float | str | None]


class ResultsDoc(TypedDict, total=False):
    """A whole ``results.json``."""

    schema: str
    created: str
    status: str  # "running", "complete" or "interrupted"
    machine: dict[str, Any]
    settings: SettingsRecord
    memory_method: str
    roof: RoofRecord
    variants: dict[str, VariantRecord]
    points: list[PointRecord]
    summary: list[SummaryRow]
    elapsed_s: float
    time_limit_reached: bool
    baseline_runs: int
