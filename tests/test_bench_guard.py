"""The speed guard on real measurements: a deliberately slowed variant is caught, a rerun of the
same code is not. Small and short (local at L=4096, forward): about half a minute."""

from __future__ import annotations

from dataclasses import replace

import pytest
from bench_slowed_variant import SLOWED_SPEC

from attnreg.bench import BenchSettings, GuardSettings, parse_variant, run_bench, run_guard


@pytest.fixture(scope="module")
def settings() -> BenchSettings:
    # As the CI preset: one thread, each variant point timed alternately with dense SDPA.
    return BenchSettings(lengths=(4096,), modes=("fwd",), causal=False, baselines=False, roof=False,
                         paired=True, threads=1, target_s=0.5, long_gate_max=1024)


def test_guard_catches_a_slowed_variant_and_passes_a_rerun(settings: BenchSettings) -> None:
    choice = parse_variant("local:window=256", settings.heads, settings.head_dim)
    slowed = replace(choice, spec=SLOWED_SPEC)  # same label and config: compared point by point
    base = run_bench(settings, [choice])
    rerun = run_bench(settings, [choice])
    slow = run_bench(settings, [slowed])
    for doc in (base, rerun, slow):
        assert doc["status"] == "complete" and doc["variants"][choice.label]["status"] == "passed"

    # As `attnreg bench --compare` does it: a failing point is measured once more to confirm.
    noise = run_guard(rerun, base, GuardSettings(), settings, [choice])
    (change,) = noise.changes
    assert change.gated and noise.ok, noise.as_json()

    caught = run_guard(slow, base, GuardSettings(), settings, [slowed])
    (reg,) = caught.regressions
    assert reg.series == choice.label and reg.length == 4096
    assert "speedup over SDPA fell" in reg.problems[0], caught.as_json()
