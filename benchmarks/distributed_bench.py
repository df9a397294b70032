"""Context-parallel benchmark: a fixed total length split over P = 1, 2, 4 gloo processes.

    python benchmarks/distributed_bench.py                  # writes docs/bench/distributed/
    python benchmarks/distributed_bench.py --quick --out /tmp/cp   # small lengths, a smoke run

For each series (variant, causal, total length L) and world size P, every rank runs one forward
+ backward of ``forward_sharded`` on its shard (float32, B=1, H=8, E=Ev=64) and reports:

- peak memory: the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
  over its RSS just before the call: what the call allocates (activations, outputs, gradients,
  receive buffers, workspace), its own input shards excluded. The ranks run with glibc's
  MALLOC_MMAP_THRESHOLD_=65536, so every block of 64 KiB or more is mapped on allocation and
  unmapped on free: RSS follows the live memory, and memory freed by an earlier series is not
  silently reused (which would hide it from the peak);
- bytes sent: ``attnreg.distributed.comm_stats()`` over the call (p2p payloads as sent; a
  collective counted once at its input size; the small agreement all-gather included);
- time: the mean of 2 calls (every rank starts together after a barrier; the slowest rank).

P = 1 also measures the plain module (``forward``, no process group) as the reference. The
processes share this machine's cores: with P > cores, time measures contention, not speed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

B, H, E = 1, 8, 64
REPEATS = 2
# (label, variant, config, causal, total length)
SERIES: list[tuple[str, str, dict[str, Any], bool, int]] = [
    ("dot_product causal", "dot_product", {}, True, 8192),
    ("local causal (w=128)", "local", {}, True, 32768),
    ("local (w=128)", "local", {}, False, 32768),
    ("linear causal", "linear", {}, True, 32768),
    ("linear", "linear", {}, False, 32768),
    ("performer causal (m=256)", "performer", {}, True, 16384),
]
QUICK = {8192: 1024, 16384: 2048, 32768: 4096}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _measure(call: Any, barrier: Any) -> dict[str, Any]:
    import attnreg.distributed as ad

    gc.collect()
    barrier()
    rss0 = _status_kb("VmRSS")
    _reset_peak()
    ad.reset_comm_stats()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    peak = max(0, _status_kb("VmHWM") - rss0) * 1024
    stats = ad.reset_comm_stats()  # this call's counts (the repeats below count afresh)
    times = [first]
    for _ in range(REPEATS - 1):
        barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak, "bytes_sent": stats.bytes_sent, "messages": stats.messages,
            "by_kind": dict(stats.by_kind), "times_s": times, "median_s": statistics.median(times)}


def worker(out_dir: str, quick: bool, only: str = "") -> None:
    """One rank: every series, written to OUT/rank<r>.json."""
    import torch
    import torch.distributed as dist

    import attnreg
    import attnreg.distributed as ad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for label, variant, cfg, causal, length in SERIES:
        if only and only not in label:
            continue
        length = QUICK[length] if quick else length
        m = attnreg.build(variant, **cfg)

        def run(n_total: int, sharded: bool = True, m: Any = m, causal: bool = causal) -> Any:
            n = ad.layout(n_total).shard_length(rank) if sharded else n_total
            q, k, v = (torch.randn(B, H, n, E, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, n, E)

            def call() -> None:
                for t in (q, k, v):
                    t.grad = None
                fn = m.forward_sharded if sharded else m
                out = fn(q, k, v, is_causal=causal)
                (out * g).sum().backward()

            return call

        run(max(64, 2 * world))()  # warm-up: kernels, thread pools, gloo connections
        results[label] = {"variant": variant, "causal": causal, "length": length, "world": world,
                          "sharded": _measure(run(length), dist.barrier)}
        if world == 1:
            results[label]["plain"] = _measure(run(length, sharded=False), dist.barrier)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _aggregate(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for label, first in per_rank[0].items():
        rows = [r[label] for r in per_rank]
        entry = {k: first[k] for k in ("variant", "causal", "length", "world")}
        for mode in ("sharded", "plain"):
            if mode not in first:
                continue
            ms = [r[mode] for r in rows]
            entry[mode] = {
                "peak_bytes_per_rank": [m["peak_bytes"] for m in ms],
                "peak_bytes_max": max(m["peak_bytes"] for m in ms),
                "bytes_sent_per_rank": [m["bytes_sent"] for m in ms],
                "bytes_sent_max": max(m["bytes_sent"] for m in ms),
                "by_kind_rank0": ms[0]["by_kind"],
                "median_s_max": max(m["median_s"] for m in ms),
            }
        out[label] = entry
    return out


def _plot(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(int(w) for w in doc["results"])
    labels = list(doc["results"][str(worlds[0])])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        mem = [doc["results"][str(w)][label]["sharded"]["peak_bytes_max"] / 2**20 for w in worlds]
        sent = [doc["results"][str(w)][label]["sharded"]["bytes_sent_max"] for w in worlds]
        axes[0].plot(worlds, [x / mem[0] for x in mem], "o-", color=cmap(i), label=label)
        axes[1].plot(worlds[1:], [max(s, 1) / 2**20 for s in sent[1:]], "o-", color=cmap(i), label=label)
    axes[0].plot(worlds, [1 / w for w in worlds], "k--", label="1/P")
    axes[0].set(xlabel="processes P", ylabel="peak memory per rank / at P=1", xticks=worlds,
                title="peak memory per rank (relative to P=1)")
    axes[1].set(xlabel="processes P", ylabel="MiB sent per rank (fwd+bwd)", xticks=worlds[1:], yscale="log",
                title="bytes sent per rank")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"context parallelism, fixed total length, gloo on {os.cpu_count()} CPU cores", fontsize=10)
    fig.tight_layout()
    path = out / "cp.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _table(doc: dict[str, Any]) -> str:
    lines = ["| series | L | P | peak MiB per rank (max) | vs P=1 | MiB sent per rank (max) | "
             "time s (fwd+bwd) |", "|---|---|---|---|---|---|---|"]
    worlds = sorted(int(w) for w in doc["results"])
    for label in doc["results"][str(worlds[0])]:
        base = doc["results"][str(worlds[0])][label]
        plain = base.get("plain")
        if plain:
            lines.append(f"| {label} | {base['length']} | 1, plain forward | "
                         f"{plain['peak_bytes_max'] / 2**20:.1f} | | 0 | {plain['median_s_max']:.2f} |")
        ref = max(1, base["sharded"]["peak_bytes_max"])
        for w in worlds:
            r = doc["results"][str(w)][label]["sharded"]
            lines.append(f"| {label} | {base['length']} | {w} | {r['peak_bytes_max'] / 2**20:.1f} | "
                         f"{r['peak_bytes_max'] / ref:.2f} | {r['bytes_sent_max'] / 2**20:.3f} | "
                         f"{r['median_s_max']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small lengths (a smoke run)")
    ap.add_argument("--worlds", default="1,2,4", help="process counts (default 1,2,4)")
    ap.add_argument("--out", default="docs/bench/distributed", help="results.json, cp.png and table.md")
    ap.add_argument("--only", default="", help="run only the series whose label contains this")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.only)
        return
    import tempfile

    import attnreg.distributed as ad

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"sizes": {"B": B, "H": H, "E": E, "Ev": E, "dtype": "float32"},
                           "repeats": REPEATS, "cpu_count": os.cpu_count(), "results": {}}
    for world in (int(w) for w in args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            argv = [__file__, "--worker", tmp, "--only", args.only] + (["--quick"] if args.quick else [])
            env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            ranks = ad.launch_local(argv, world, timeout=args.timeout, env=env)
            bad = [r for r in ranks if r.returncode != 0]
            if bad:
                r = bad[0]
                sys.exit(f"P={world}: rank {r.rank} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        doc["results"][str(world)] = _aggregate(per_rank)
        print(f"P={world}: {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    table = _table(doc)
    (out / "table.md").write_text(table + "\n")
    print(table)
    try:
        for p in _plot(doc, out):
            print("wrote", p)
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'attnreg[plot]')")


if __name__ == "__main__":
    main()
