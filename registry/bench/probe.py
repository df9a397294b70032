"""Measuring one point in a fresh process: peak memory and time, with hard guards.

Each point runs in its own child process, forked from a ``forkserver`` that has imported torch
but never run an operator (so OpenMP thread pools are never inherited across ``fork``). The child

1. runs the point twice at ``min(L, 1024)`` (loads kernels, thread pools, the fast paths' one-time
   allocations: not counted),
2. builds the inputs (and the variant's dense mask for ``sdpa_masked`` / ``sdpa_masked_bool``):
   their RSS growth is reported as ``input_bytes``,
3. resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``),
4. runs the point once: ``peak_bytes = VmHWM - RSS before the call`` is what the call itself
   allocated (activations, output, gradients, workspace),
5. times repeats (the first call is the excluded warm-up), unless that first call was slower than
   ``slow_s``: then it is the only sample;
6. for a job with a ``reference`` (the speed guard's paired timing), builds the reference too and
   times the two calls alternately (ref, job, job, ref, ...): both see the same machine load, so
   the per-pair ratios hold on a busy machine where separately timed points do not.

Why peak RSS and not torch allocator statistics: torch has no CPU allocator statistics for
ordinary tensors, and RSS also sees memory that kernels (oneDNN, SDPA workspaces) allocate outside
torch's allocator. The parent polls the child's RSS and kills it past ``--max-memory``, and kills
it when its call overruns the per-point time budget: a wrong estimate cannot take the machine down.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cases import Job, prepare

__all__ = ["ProbeResult", "Prober", "timed_repeats", "MEMORY_METHOD"]

MEMORY_METHOD = (
    "peak RSS of a fresh process during one call (VmHWM reset via /proc/self/clear_refs) "
    "minus its RSS just before the call; inputs excluded"
)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_POLL_S = 0.02
WARMUP_LENGTH = 1024
_OOM_TEXT = "can't allocate memory"  # DefaultCPUAllocator's message for a refused allocation


@dataclass
class ProbeResult:
    """What one probe measured, or why it did not."""

    status: str  # ok | memory | timeout | error | unpicklable
    reason: str | None = None
    samples: list[float] = field(default_factory=list)
    first_s: float | None = None
    warmup: bool = False
    peak_bytes: int | None = None
    input_bytes: int | None = None
    memory_method: str = MEMORY_METHOD
    info: dict[str, Any] = field(default_factory=dict)  # the point's own report (Prepared.info)
    ref_samples: list[float] = field(default_factory=list)  # paired timing: the reference's times

    @property
    def total_bytes(self) -> int | None:
        """Inputs plus the call's peak: what the point needs in all."""
        if self.peak_bytes is None:
            return None
        return self.peak_bytes + (self.input_bytes or 0)


def _status_bytes(pid: int | str, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status in bytes, None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def timed_repeats(call: Callable[[], None], first_s: float, target_s: float, slow_s: float,
                  max_repeats: int = 50, min_repeats: int = 3) -> tuple[list[float], bool]:
    """Time repeats of ``call`` after a first call that took ``first_s`` (the warm-up).

    About ``target_s`` of repeats (at least ``min_repeats``, so that the median can reject one
    disturbed call on a shared machine; at most ``max_repeats``); if the first call was slower
    than ``slow_s`` it is the only sample (returned with ``warmup=False``).
    """
    if first_s >= slow_s:
        return [first_s], False
    n = min(max_repeats, max(min_repeats, math.ceil(target_s / max(first_s, 1e-9))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples, True


def paired_repeats(call: Callable[[], None], ref: Callable[[], None], target_s: float,
                   min_pairs: int = 5, max_pairs: int = 50, slow_s: float = 2.0
                   ) -> tuple[list[float], list[float]]:
    """Time ``call`` and ``ref`` alternately (the order flips every pair, so neither always runs
    right after the other): about ``target_s`` in all, at least ``min_pairs`` pairs (3 when a
    pair takes longer than ``slow_s``: a median of 3 still rejects one disturbed pair)."""
    times: tuple[list[float], list[float]] = ([], [])
    budget_end = None
    for i in range(max_pairs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (call if which == 0 else ref)()
            times[which].append(time.perf_counter() - t0)
        if budget_end is None:
            budget_end = time.perf_counter() + target_s - (times[0][0] + times[1][0])
            if times[0][0] + times[1][0] > slow_s:
                min_pairs = min(min_pairs, 3)
        if i + 1 >= min_pairs and time.perf_counter() >= budget_end:
            break
    return times


def _child(job: Job, threads: int, target_s: float, slow_s: float, repeat: bool, conn: Any) -> None:
    """Body of the measuring process (see the module docstring)."""
    try:
        import torch

        torch.set_num_threads(threads)
        # Warm-up at up to WARMUP_LENGTH: long enough that blocked fast paths run (local's blocks
        # start above block + 2 * window), so their one-time allocations (kernel workspaces,
        # cached masks, allocator arenas: ~9 MB for local at L=4096) do not count as the point's
        # memory; never longer than the point itself.
        warm = prepare(job.at_length(min(job.length, WARMUP_LENGTH)))
        warm.call()
        warm.call()
        del warm  # freed by reference counting; gc.collect() costs ~0.2 s in a torch process
        rss0 = _status_bytes("self", "VmRSS") or 0
        prep = prepare(job)
        rss1 = _status_bytes("self", "VmRSS") or 0
        reset = _reset_peak()
        base = _status_bytes("self", "VmRSS") or 0
        conn.send(("ready", rss1 - rss0))
        t0 = time.perf_counter()
        prep.call()
        first = time.perf_counter() - t0
        conn.send(("first", first))  # the watchdog now sizes the repeats' deadline from it
        hwm = _status_bytes("self", "VmHWM")
        peak = None if hwm is None or not reset else max(0, hwm - base)
        ref_samples: list[float] = []
        if job.reference is not None and repeat:
            ref = prepare(job.reference)
            ref.call()  # its warm-up
            samples, ref_samples = paired_repeats(prep.call, ref.call, target_s, max_pairs=prep.max_repeats)
            warm = True
        else:
            samples, warm = (timed_repeats(prep.call, first, target_s, slow_s, prep.max_repeats) if repeat
                             else ([first], False))
        conn.send(("done", dict(samples=samples, first_s=first, warmup=warm, peak_bytes=peak,
                                input_bytes=rss1 - rss0, info=prep.info, ref_samples=ref_samples)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised there
        # torch's CPU allocator refusing a huge request is the point not fitting, not a bug.
        tag = "memory" if isinstance(exc, MemoryError) or _OOM_TEXT in str(exc) else "error"
        try:
            conn.send((tag, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


class Prober:
    """Runs jobs in fresh processes with a memory watchdog and a time limit."""

    def __init__(self, threads: int, max_memory: int, max_call_s: float,
                 preload: tuple[str, ...] = ()) -> None:
        self.threads = threads
        self.max_memory = max_memory
        self.max_call_s = max_call_s
        # Modules imported once by the fork server, not in every child: the variants' plugins, and
        # what torch imports lazily on first use (~1-2 s each): sympy on the first backward with a
        # non-scalar gradient, torch._dynamo on the first torch.utils.checkpoint call.
        self.preload = ("torch", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                        "attnreg.bench.cases", *preload)
        self._ctx: Any = None

    def _context(self) -> Any:
        if self._ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(list(dict.fromkeys(self.preload)))
            self._ctx = ctx
        return self._ctx

    def run(self, job: Job, target_s: float, slow_s: float, repeat: bool = True,
            max_call_s: float | None = None) -> ProbeResult:
        """Measure ``job`` in a fresh process (``repeat=False``: one call, for estimates).
        ``max_call_s`` overrides the prober's per-call budget for this job."""
        try:
            pickle.dumps(job)
        except Exception as exc:  # noqa: BLE001 - e.g. a factory defined in a notebook
            return ProbeResult("unpicklable", f"cannot send the variant to a fresh process: {exc}")
        ctx = self._context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(job, self.threads, target_s, slow_s, repeat, send),
                           daemon=True)
        proc.start()
        send.close()
        try:
            return self._watch(proc, recv, target_s, slow_s, max_call_s or self.max_call_s)
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            recv.close()

    def _watch(self, proc: Any, recv: Any, target_s: float, slow_s: float, budget: float) -> ProbeResult:
        start_rss = None
        input_bytes = None
        # Building inputs (and a dense mask) gets a generous allowance; the call gets the budget.
        deadline = time.monotonic() + 60.0 + budget
        why = f"building the inputs and one call ran past 60 s + the per-point budget of {budget:g} s"
        while True:
            if recv.poll(_POLL_S):
                try:
                    tag, payload = recv.recv()
                except EOFError:
                    return self._died(proc)
                if tag == "ready":
                    input_bytes = payload
                    deadline = time.monotonic() + budget + 10.0  # the first call
                    why = f"one call ran past the per-point budget of {budget:g} s"
                elif tag == "first":
                    # The repeats (at most ~target_s of them past 3-5 calls, twice that when paired
                    # with a reference) get a deadline from the first call's time, not the budget:
                    # the budget is for one call, not for the whole measurement.
                    deadline = time.monotonic() + 2 * target_s + 12 * payload + 30.0
                    why = f"the timed repeats ran past 12x the first call ({payload:.3g} s) + 30 s"
                elif tag == "done":
                    return ProbeResult("ok", **payload)
                elif tag == "memory":
                    return ProbeResult("memory", f"out of memory: {payload}", input_bytes=input_bytes)
                else:
                    return ProbeResult("error", str(payload), input_bytes=input_bytes)
            elif not proc.is_alive():
                return self._died(proc)
            rss = _status_bytes(proc.pid, "VmRSS")
            if rss is not None:
                start_rss = rss if start_rss is None else start_rss
                if rss - start_rss > self.max_memory:
                    proc.kill()
                    return ProbeResult(
                        "memory", f"killed: used more than --max-memory {self.max_memory / 2**30:.1f} GiB",
                        input_bytes=input_bytes, peak_bytes=rss - start_rss,
                    )
            if time.monotonic() > deadline:
                proc.kill()
                return ProbeResult(
                    "timeout", f"killed: {why}", input_bytes=input_bytes,
                )

    @staticmethod
    def _died(proc: Any) -> ProbeResult:
        proc.join(5)
        code = proc.exitcode
        why = "killed by the system (out of memory?)" if code == -9 else f"exit code {code}"
        return ProbeResult("error", f"measuring process died: {why}")
