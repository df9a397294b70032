"""Fixed benchmark presets. ``ci``: the speed guard CI runs against a committed baseline.

The CI preset measures each built-in's fast path at lengths where it matters (2K-8K), in the
modes where a regression would hurt, against dense SDPA only, timed alternately with each
variant point in the same process (``paired``: the ratio then holds on a busy machine). It must
stay under 3 minutes on 2 cores: every point costs a fresh process, two calibration calls per
series and >= 5 pairs. Its points are known to fit, so a noisy time estimate never skips one (the
watchdog still kills a call past the budget).

Decoding steps are not in it: a 0.1 ms step of linear or local paired with a 4 ms SDPA step over
an 8K cache gave speedups spread 2.3x over three runs (the big call evicts the small one's state
from cache, by a varying amount); `attnreg bench --modes decode` measures them instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .settings import BenchSettings, VariantChoice, parse_variant

__all__ = ["CI_BASELINE", "CI_PRESET", "PresetEntry", "ci_choices", "ci_settings"]


@dataclass(frozen=True)
class PresetEntry:
    """One variant of a preset and the (mode, causal, length) points measured for it."""

    variant: str  # parse_variant syntax: "local:window=256"
    modes: tuple[str, ...]
    causal: tuple[bool, ...]
    lengths: tuple[int, ...]

    def points(self) -> frozenset[tuple[str, bool, int]]:
        """Every (mode, causal, L) of the entry."""
        return frozenset((m, c, n) for m in self.modes for c in self.causal for n in self.lengths)


CI_PRESET: tuple[PresetEntry, ...] = (
    # local: the blocked path (one shared band mask keeps SDPA on its flash kernel).
    PresetEntry("local:window=256", ("fwd",), (False, True), (4096,)),
    PresetEntry("local:window=256", ("fwd",), (True,), (8192,)),
    PresetEntry("local:window=256", ("fwdbwd",), (True,), (4096,)),
    # bigbird: the gather-only-active-blocks path.
    PresetEntry("bigbird", ("fwd",), (False,), (4096,)),
    # linear: the streamed chunked kernel and its hand-written backward; the non-causal form.
    PresetEntry("linear", ("fwd", "fwdbwd"), (True,), (4096,)),
    PresetEntry("linear", ("fwd",), (True,), (8192,)),
    PresetEntry("linear", ("fwd",), (False,), (4096,)),
    # additive: the query-chunked path (its point is memory; the backward recomputes chunks).
    PresetEntry("additive", ("fwd",), (True,), (2048,)),
)

# The committed baseline the CI guard compares with (refresh: docs/benchmarks.md).
CI_BASELINE = Path("benchmarks") / "ci-baseline.json"


def ci_settings() -> BenchSettings:
    """The settings of the CI preset: B=1, H=8, E=64, float32, ONE thread.

    One thread because ratios measured with two threads on a 2-core machine that anything else
    touches move by 2-5x between runs (a kernel with many short parallel regions waits at every
    barrier for a descheduled thread, one long SDPA call does not); single-threaded, a competing
    process slows both sides of a ratio alike (docs/benchmarks.md, "Speed guard")."""
    lengths = tuple(sorted({n for e in CI_PRESET for n in e.lengths}))
    return BenchSettings(lengths=lengths, threads=1, baselines=False, roof=False, paired=True, preset="ci",
                         target_s=1.0, long_gate_max=1024, max_call_s=30.0, max_baseline_call_s=30.0,
                         skip_by_time_estimate=False)


def ci_choices(settings: BenchSettings) -> list[VariantChoice]:
    """The preset's variants, one choice per label, each restricted to its points."""
    merged: dict[str, VariantChoice] = {}
    for entry in CI_PRESET:
        choice = parse_variant(entry.variant, settings.heads, settings.head_dim)
        have = merged.get(choice.label)
        points = entry.points() | (have.only or frozenset() if have else frozenset())
        merged[choice.label] = replace(have or choice, only=points)
    return list(merged.values())
