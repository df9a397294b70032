"""Every registered variant (and its baselines) as pytest-benchmark cases; see conftest.py.

Each case runs the harness's correctness gate for its variant (once per session), skips with the
reason when ``attnreg bench``'s estimates say the point cannot fit the memory or time budget
(cases run lengths ascending, so each series extrapolates from its smaller lengths), measures
peak memory in a fresh process (the same probe as ``attnreg bench``; its watchdog also enforces
the budgets), then times the same call with ``benchmark.pedantic``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch


def test_attention(benchmark: Any, case: Any, bench_context: Any) -> None:
    from attnreg.bench import Job, prepare, run_gate
    from attnreg.bench.cases import build_module, sdpa_flops, variant_flops

    settings, choices, prober, gates, feasible = bench_context
    choice = choices.get(case.label)
    if choice is not None:
        if choice.label not in gates:
            gates[choice.label] = run_gate(choice, 1, settings.heads, settings.head_dim,
                                           settings.gate_length, settings.dtype,
                                           settings.causal_flags(choice.spec.capabilities.causal),
                                           "fwdbwd" in settings.modes, settings.seed)
        gate = gates[choice.label]
        if not gate.ok:
            pytest.fail(f"{choice.label} failed the correctness gate (not timed): {gate.reason}")
    job = Job(case.kind, case.length, settings.batch, settings.heads, settings.head_dim, settings.dtype,
              case.mode, case.causal, factory=choice.spec.factory if choice else None,
              config=choice.config if choice else None, baseline=case.baseline, seed=settings.seed)
    key = (case.series, case.mode, case.causal)
    est = feasible.check(key, job)
    if est.skip is not None:
        pytest.skip(est.skip)
    probe = prober.run(job, settings.target_s, settings.slow_s, repeat=False, max_call_s=feasible.budget(job))
    if probe.status in ("memory", "timeout"):
        feasible.rule_out(key, probe.reason or probe.status, case.length)
        pytest.skip(probe.reason)
    feasible.record(key, case.length, probe)
    if probe.status not in ("ok", "unpicklable"):
        pytest.fail(f"{case.id}: {probe.reason}")
    flops = None
    if case.kind == "sdpa":
        flops = sdpa_flops(settings.batch, settings.heads, case.length, settings.head_dim, case.causal)
    elif case.kind == "variant":
        flops = variant_flops(build_module(job), job, choice.is_dense_sdpa)
    if flops is not None and case.mode == "fwdbwd":
        flops *= 3.0
    benchmark.group = f"{case.mode}{' causal' if case.causal else ''} L={case.length}"
    benchmark.extra_info.update(peak_bytes=probe.peak_bytes, input_bytes=probe.input_bytes, flops=flops,
                                threads=settings.threads, torch=torch.__version__)
    torch.set_num_threads(settings.threads)
    prep = prepare(job)
    first = probe.first_s or settings.slow_s
    rounds = 1 if first >= settings.slow_s else min(50, max(3, math.ceil(settings.target_s / first)))
    benchmark.pedantic(prep.call, rounds=rounds, warmup_rounds=0 if first >= settings.slow_s else 1,
                       iterations=1)
