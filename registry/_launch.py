"""Running P ranks on this machine: threads of this process (``simulate``, for checks and tests of
a distributed form) or separate processes (``launch_local``, what ``torchrun --standalone`` does,
with a time limit and no process left behind)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RankResult", "free_port", "launch_local", "simulate"]


def simulate(world: int, fn: Callable[[int, Any], Any], *, timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, group)`` for ``rank`` in ``range(world)`` in threads of this process, each
    with its own gloo process group (an in-memory store, loopback connections), and return the
    results in rank order. The first exception of any rank is re-raised (with its rank noted).

    Cheap (no process is started) and leak-free: a rank stuck in a collective fails after
    ``timeout`` seconds (the groups' own timeout) and the threads are daemons.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError("simulate needs torch.distributed with the gloo backend")
    store = dist.HashStore()
    results: list[Any] = [None] * world
    errors: list[tuple[int, BaseException]] = []

    def run(rank: int) -> None:
        try:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            opts._timeout = datetime.timedelta(seconds=timeout)
            group = dist.ProcessGroupGloo(dist.PrefixStore("attnreg", store), rank, world, opts)
            results[rank] = fn(rank, group)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            errors.append((rank, err))

    threads = [threading.Thread(target=run, args=(r,), daemon=True, name=f"attnreg-rank{r}")
               for r in range(world)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 10.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"simulate: ranks {[r for r, t in enumerate(threads) if t.is_alive()]} "
                           f"still running after {timeout + 10:.0f} s")
    if errors:
        rank, err = min(errors, key=lambda e: e[0])
        err.add_note(f"(raised on rank {rank} of {world} simulated ranks)")
        raise err
    return results


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankResult:
    """How one process of ``launch_local`` ended."""

    rank: int
    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str


def launch_local(argv: Sequence[str], world: int, *, timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> list[RankResult]:
    """Run ``python argv...`` as ``world`` processes with the torchrun environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so that
    ``torch.distributed.init_process_group("gloo")`` connects them. Waits at most ``timeout``
    seconds in all; on timeout, or as soon as one process fails, the others are killed. Returns
    each rank's exit code and output; never leaves a process running.
    """
    port = free_port()
    base = {**os.environ, **(env or {}), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    procs = []
    try:
        for r in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, *argv], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = _wait_all(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [RankResult(r, code, out, err) for r, (code, out, err) in enumerate(outputs)]


def _wait_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int | None, str, str]]:
    """Collect every process's output; kill the rest at the deadline or after a failure."""
    deadline = time.monotonic() + timeout
    outs: dict[int, tuple[int | None, str, str]] = {}

    def read(i: int, p: subprocess.Popen[str]) -> None:
        out, err = p.communicate()
        outs[i] = (p.returncode, out, err)

    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    while time.monotonic() < deadline and any(t.is_alive() for t in readers):
        if any(code not in (0, None) for code, _, _ in list(outs.values())):
            break  # one rank failed: the others would wait for it until their own timeout
        time.sleep(0.05)
    killed = set()
    for i, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            killed.add(i)
    for t in readers:
        t.join(10.0)
    results = []
    for i in range(len(procs)):
        code, out, err = outs.get(i, (None, "", ""))
        results.append((None if i in killed else code, out, err))
    return results
