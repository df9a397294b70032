"""The benchmark loop: gate each variant, then measure every point with its baselines.

Order: lengths ascending (outermost), so that an interrupted run still covers every variant at
the smaller lengths and every series can extrapolate its next point from the measured ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .analysis import iqr, median
from .cases import MASKED, Job, build_module, prepare, sdpa_flops, variant_flops
from .derive import derive
from .feasibility import Feasibility
from .gate import run_gate
from .probe import MEMORY_METHOD, Prober, ProbeResult, timed_repeats
from .records import PointRecord, ResultsDoc, VariantRecord
from .report import machine_info, write_json
from .settings import BenchSettings, VariantChoice

__all__ = ["run_bench", "SCHEMA"]

SCHEMA = "attnreg-bench/1"
GEMM_SIZES, QUICK_GEMM_SIZES = (1024, 2048), (128, 256)
Progress = Callable[[str, int, int], None]  # (description, points done, points planned)


class _Run:
    def __init__(self, settings: BenchSettings, choices: list[VariantChoice], out: Path | None,
                 progress: Progress | None, prober: Prober | None) -> None:
        self.s = settings
        self.choices = choices
        self.out = out
        self.progress = progress or (lambda desc, done, total: None)
        preload = tuple(m for c in choices for m in (getattr(c.spec.factory, "__module__", None),
                                                     type(c.config).__module__) if m)
        self.prober = prober or Prober(settings.threads, settings.max_memory, settings.max_call_s, preload)
        self.feasible = Feasibility(settings, self.prober)
        self.ok: set[tuple[str, str, bool, int]] = set()  # (series, mode, causal, L) measured
        self.modules: dict[str, Any] = {}
        self.doc: ResultsDoc = {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
            "machine": machine_info(settings.threads),
            "settings": settings.as_json(),
            "memory_method": MEMORY_METHOD,
            "roof": {"gemm": []},
            "variants": {},
            "points": [],
        }

    # -- plumbing ---------------------------------------------------------------------------
    def save(self) -> None:
        if self.out is not None:
            write_json(self.doc, self.out / "results.json")

    def job(self, kind: str, length: int, mode: str, causal: bool, choice: VariantChoice | None = None,
            baseline: str | None = None) -> Job:
        s = self.s
        return Job(kind, length, s.batch, s.heads, s.head_dim, s.dtype, mode, causal,
                   factory=choice.spec.factory if choice else None, config=choice.config if choice else None,
                   baseline=baseline, seed=s.seed)

    # -- one point --------------------------------------------------------------------------
    def measure(self, series: str, job: Job, flops: float | None, meta: dict[str, Any]) -> PointRecord:
        """Guard, measure and record one point (``meta`` names its series, kind and variant)."""
        s = self.s
        point: PointRecord = {**meta, "series": series, "mode": job.mode, "causal": job.causal,
                                 "length": job.length, "status": "ok", "reason": None}
        key = (series, job.mode, job.causal)
        needs = point.pop("needs", None)
        if needs is not None and not any((n, job.mode, job.causal, job.length) in self.ok for n in needs):
            return self.skip(point, "not needed: no variant to compare with was measured at this length")
        est = self.feasible.check(key, job)
        point["estimate"] = est.as_json()
        if est.skip is not None:
            return self.skip(point, est.skip)
        budget = self.feasible.budget(job)
        res = self.prober.run(job, s.target_s, s.slow_s, max_call_s=budget)
        if res.status == "unpicklable":
            res = self.in_process(job, res.reason or "")
        if res.status in ("memory", "timeout"):
            self.feasible.rule_out(key, res.reason or res.status, job.length)
            return self.skip(point, res.reason or res.status)
        if res.status != "ok":
            point.update(status="error", reason=res.reason)
            return point
        self.feasible.record(key, job.length, res)
        point["time"] = {"median_s": median(res.samples), "iqr_s": iqr(res.samples),
                         "min_s": min(res.samples), "repeats": len(res.samples),
                         "warmup_excluded": res.warmup, "samples_s": res.samples}
        if res.ref_samples:
            point["paired"] = {"series": "sdpa", "samples_s": res.ref_samples,
                               "ratios": [r / v for r, v in zip(res.ref_samples, res.samples, strict=True)]}
        point["memory"] = {"peak_bytes": res.peak_bytes, "input_bytes": res.input_bytes}
        if "state_bytes" in res.info:  # decode mode: what the state keeps between tokens
            point["memory"]["state_bytes"] = res.info["state_bytes"]
        if res.status == "ok" and res.reason:
            point["note"] = res.reason
        if flops is not None:
            point["flops"] = flops * (3.0 if job.mode == "fwdbwd" else 1.0)
        self.ok.add((series, job.mode, job.causal, job.length))
        return point

    @staticmethod
    def skip(point: PointRecord, reason: str) -> PointRecord:
        point.update(status="skipped", reason=reason)
        return point

    def in_process(self, job: Job, why: str) -> ProbeResult:
        """Fallback for variants that cannot be sent to a fresh process: time here, no memory."""
        try:
            prep = prepare(job)
            t0 = time.perf_counter()
            prep.call()
            first = time.perf_counter() - t0
            samples, warm = timed_repeats(prep.call, first, self.s.target_s, self.s.slow_s, prep.max_repeats)
        except Exception as exc:  # noqa: BLE001
            return ProbeResult("error", f"{type(exc).__name__}: {exc}")
        return ProbeResult("ok", f"timed in the main process, memory not measured ({why})",
                           samples=samples, first_s=first, warmup=warm, info=prep.info)

    # -- the run ----------------------------------------------------------------------------
    def roof(self, when: str) -> None:
        if not self.s.roof:
            self.doc["roof"]["gflops"] = None
            return
        for n in QUICK_GEMM_SIZES if self.s.quick else GEMM_SIZES:
            res = self.prober.run(self.job("gemm", n, "fwd", False), max(self.s.target_s, 0.2), 1e9)
            if res.status == "ok":
                # The roof is what the machine CAN do: the fastest repeat, not the median.
                gflops = 2.0 * n**3 / min(res.samples) / 1e9
                self.doc["roof"]["gemm"].append({"n": n, "when": when, "gflops": gflops,
                                                 "median_s": median(res.samples), "min_s": min(res.samples)})
        rates = [g["gflops"] for g in self.doc["roof"]["gemm"]]
        self.doc["roof"]["gflops"] = max(rates) if rates else None

    def gate_all(self) -> list[VariantChoice]:
        s, passed = self.s, []
        for choice in self.choices:
            caps = choice.spec.capabilities
            entry: VariantRecord = {"name": choice.spec.name, "max_length": choice.max_length,
                                     "config": choice.config.model_dump(mode="json"),
                                     "capabilities": caps.flags(), "complexity": caps.complexity}
            self.doc["variants"][choice.label] = entry
            if s.torch_dtype not in caps.dtypes:
                entry.update(status="unsupported", reason=f"dtype {s.dtype} not supported")
                continue
            flags = s.causal_flags(caps.causal)
            if not flags:
                entry.update(status="unsupported", reason="only causal was asked; the variant is not causal")
                continue
            gate = run_gate(choice, 1, s.heads, s.head_dim, s.gate_length, s.dtype, flags,
                            "fwdbwd" in s.modes, s.seed, long_length=s.long_gate_length,
                            decode="decode" in s.modes and caps.decoding)
            entry["gate"] = gate.as_json()
            entry.update(status="passed" if gate.ok else "failed", reason=gate.reason)
            if gate.ok:
                module = build_module(self.job("variant", 1, "fwd", False, choice))
                self.modules[choice.label] = module
                hooks = module.benchmark_hooks()
                entry["pattern_mask"] = "pattern_mask" in hooks
                own = sorted(module.benchmark_baselines())
                # The bench itself times SDPA with pattern_mask (sdpa_masked[...], float and bool):
                # a variant's own "sdpa_dense..." baseline would be the same measurement again.
                dup = [b for b in own if entry["pattern_mask"] and b.startswith("sdpa_dense")]
                entry["baselines"] = [b for b in own if b not in dup]
                if dup:
                    entry["baselines_not_run"] = {b: "same as the bench's sdpa_masked_bool baseline"
                                                   for b in dup}
                entry["flops"] = "flops" in hooks or choice.is_dense_sdpa
                passed.append(choice)
        return passed

    def plan(self, passed: list[VariantChoice]) -> list[tuple[str, Job, float | None, dict[str, Any]]]:
        """Per (L, mode, causal): the variants, then the baselines. A baseline point ``needs`` a
        measured variant point at the same (L, mode, causal): baselines are only there to be
        compared with, and the dense ones are the slowest points of a run."""
        s, plan = self.s, []
        for length in s.lengths:
            for mode in s.modes:
                for causal in s.causal_flags(True, mode):
                    group = [c for c in passed if causal in s.causal_flags(c.spec.capabilities.causal, mode)
                             and c.wants(mode, causal, length)
                             and (mode != "decode" or c.spec.capabilities.decoding)]
                    baselines = []
                    for c in group:
                        entry, module = self.doc["variants"][c.label], self.modules[c.label]
                        job = self.job("variant", length, mode, causal, c)
                        if s.paired:
                            job = replace(job, reference=self.job("sdpa", length, mode, causal))
                        flops = None if mode == "decode" else variant_flops(module, job, c.is_dense_sdpa)
                        plan.append((c.label, job, flops, {"kind": "variant", "variant": c.label}))
                        meta = {"variant": c.label, "needs": [c.label]}
                        if not s.baselines or mode == "decode":
                            continue
                        if entry["pattern_mask"]:
                            for kind in MASKED:
                                job = self.job(kind, length, mode, causal, c)
                                baselines.append((f"{kind}[{c.label}]", job, None, {**meta, "kind": kind}))
                        for b in entry["baselines"]:
                            job = self.job("baseline", length, mode, causal, c, b)
                            meta_b = {**meta, "kind": "baseline", "baseline": b}
                            baselines.append((f"{c.label}:{b}", job, None, meta_b))
                    if (passed and not group) or s.paired:
                        continue  # no variant wants this point; or SDPA is timed with each variant
                    needs = [c.label for c in group] if passed else None
                    dense = (None if mode == "decode"
                             else sdpa_flops(s.batch, s.heads, length, s.head_dim, causal))
                    plan.append(("sdpa", self.job("sdpa", length, mode, causal), dense,
                                 {"kind": "sdpa", "variant": None, "needs": needs}))
                    plan.extend(baselines)
        return plan

    def run(self) -> ResultsDoc:
        t0 = time.monotonic()
        try:
            self.progress("measuring the GEMM roof", 0, 0)
            self.roof("start")
            self.progress("correctness gates", 0, 0)
            plan = self.plan(self.gate_all())
            self.save()
            for i, (series, job, flops, meta) in enumerate(plan):
                self.progress(f"{series} {job.mode}{' causal' if job.causal else ''} L={job.length}",
                              i, len(plan))
                limit = self.s.time_limit_s
                if limit is not None and time.monotonic() - t0 > limit:
                    point: PointRecord = {**meta, "series": series, "mode": job.mode, "causal": job.causal,
                             "length": job.length}
                    point.pop("needs", None)
                    self.doc["time_limit_reached"] = True
                    self.doc["points"].append(self.skip(point, f"run time limit of {limit:g} s reached"))
                    continue
                self.doc["points"].append(self.measure(series, job, flops, meta))
                derive(self.doc)
                self.save()
            self.progress("measuring the GEMM roof again", len(plan), len(plan))
            self.roof("end")
            self.doc["status"] = "complete"
        except KeyboardInterrupt:
            self.doc["status"] = "interrupted"
        finally:
            self.doc["elapsed_s"] = time.monotonic() - t0
            self.doc["machine"]["loadavg_end"] = machine_info(self.s.threads).get("loadavg")
            derive(self.doc)
            self.save()
        return self.doc


def run_bench(settings: BenchSettings, choices: list[VariantChoice], out: Path | None = None,
              progress: Progress | None = None, prober: Prober | None = None) -> ResultsDoc:
    """Run the benchmark and return the results document (also written to ``out/results.json``).

    Ctrl-C stops the run and returns (and writes) the partial results with ``status="interrupted"``.
    """
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    return _Run(settings, choices, out, progress, prober).run()
