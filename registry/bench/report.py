"""Reports of a results document: machine info, JSON I/O, rich tables, comparison of two runs."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnreg.core import ConfigError

from .cases import MASKED
from .records import PointRecord, ResultsDoc

__all__ = [
    "machine_info", "write_json", "load_results", "results_table", "summary_table", "brief_table",
    "print_report",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core counts, threads used, torch/python versions, RAM and load average."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        info["loadavg"] = None
    try:
        with open("/proc/meminfo") as fh:
            info["ram_bytes"] = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        info["ram_bytes"] = None
    return info


def write_json(doc: ResultsDoc, path: Path) -> None:
    """Write atomically (a partial file never replaces a complete one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_results(path: Path) -> ResultsDoc:
    """Read a ``results.json``; ``ConfigError`` naming the file if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read benchmark results {str(path)!r}: {exc}") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("attnreg-bench/"):
        raise ConfigError(f"{str(path)!r} is not an attnreg bench results.json (no 'schema' key)")
    return doc


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3g}"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _peak(p: PointRecord) -> int | None:
    return (p.get("memory") or {}).get("peak_bytes")


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def results_table(doc: ResultsDoc) -> Table:
    """One row per point: time, rate, memory, roof ratio, speedups (or why it was skipped)."""
    table = Table(title="attnreg bench: points (ratios are within this run)", show_lines=False)
    for col in ("series", "mode", "L", "median ms", "IQR ms", "n", "Mtok/s", "peak MB", "GFLOP/s",
                "roof", "vs SDPA", "vs masked", "vs bool-masked", "vs own baselines / status"):
        table.add_column(col, justify="left" if col in ("series", "mode") or "/" in col else "right")
    for p in doc["points"]:
        mode = p["mode"] + (" causal" if p["causal"] else "")
        if p.get("status") != "ok":
            table.add_row(escape(p["series"]), mode, str(p["length"]), *["-"] * 10,
                          f"[yellow]{p['status']}[/]: {escape(str(p.get('reason')))}")
            continue
        t, sp = p["time"], p.get("speedup", {})
        own = escape(", ".join(f"{k} {v:.2f}x" for k, v in sp.items() if k not in ("sdpa", *MASKED)))
        style = "bold" if p["kind"] == "variant" else "dim"
        table.add_row(
            f"[{style}]{escape(p['series'])}[/]", mode, str(p["length"]), _ms(t["median_s"]), _ms(t["iqr_s"]),
            str(t["repeats"]), f"{p['tokens_per_s'] / 1e6:.3g}", _mb(_peak(p)),
            "-" if p.get("gflops") is None else f"{p['gflops']:.1f}",
            "-" if p.get("roof_ratio") is None else f"{p['roof_ratio']:.0%}",
            _x(sp.get("sdpa")), _x(sp.get("sdpa_masked")), _x(sp.get("sdpa_masked_bool")), own,
        )
    return table


def _exp(fit: dict[str, float] | None) -> str:
    if not fit:
        return "-"
    return f"{fit['exponent']:.2f} ({int(fit['x_min'])}..{int(fit['x_max'])})"


def _cross(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if c["kind"] == "interpolated":
        return f"L~{c['length']:.0f}"
    if c["kind"] == "always":
        return f"<= {c['length']:.0f}"
    return c["kind"]


def summary_table(doc: ResultsDoc) -> Table:
    """Per variant: gate result; per series: scaling exponents and crossover lengths."""
    table = Table(title="scaling (least-squares log-log fit) and crossover vs dense SDPA")
    for col in ("series", "mode", "time ~ L^", "memory ~ L^", "faster than SDPA from",
                "faster than masked SDPA from", "than bool-masked from", "skipped"):
        table.add_column(col)
    for row in doc.get("summary", []):
        table.add_row(escape(row["series"]), row["mode"] + (" causal" if row["causal"] else ""),
                      _exp(row["time_exponent"]), _exp(row["memory_exponent"]),
                      _cross(row.get("crossover_vs_sdpa")), _cross(row.get("crossover_vs_sdpa_masked")),
                      _cross(row.get("crossover_vs_sdpa_masked_bool")),
                      escape(", ".join(row["skipped"])) or "")
    for label, v in doc.get("variants", {}).items():
        if v.get("status") == "failed":
            table.add_row(f"[red]{escape(label)}[/]", "-", "-", "-", "-", "-", "-",
                          f"[red]failed the correctness gate, not timed[/]: {escape(str(v.get('reason')))}")
        elif v.get("status") == "unsupported":
            table.add_row(f"[yellow]{escape(label)}[/]", "-", "-", "-", "-", "-", "-",
                          f"not measured: {escape(str(v.get('reason')))}")
    return table


def brief_table(doc: ResultsDoc) -> Table:
    """One row per variant: its status and, per (mode, causal), its time and speedup over dense
    SDPA at the longest length it was measured at. What a smoke test (``--quick``) needs."""
    panels = sorted({(p["mode"], bool(p["causal"])) for p in doc["points"]})
    table = Table(title="attnreg bench: variants at their longest measured length "
                  "(time, speedup over dense SDPA in this run)")
    table.add_column("variant", style="bold")
    table.add_column("status")
    for mode, causal in panels:
        table.add_column(mode + (" causal" if causal else ""), justify="right")
    for label, v in doc.get("variants", {}).items():
        status = v.get("status", "ok")
        if status in ("failed", "unsupported"):
            reason = escape(str(v.get("reason")))[:80]
            what = "gate failed" if status == "failed" else "not measured"
            table.add_row(escape(label), f"[red]{what}[/]: {reason}", *["-"] * len(panels))
            continue
        cells = []
        for mode, causal in panels:
            pts = [p for p in doc["points"] if p["series"] == label and p["mode"] == mode
                   and bool(p["causal"]) == causal]
            ok = [p for p in pts if p.get("status") == "ok"]
            if not ok:
                cells.append("-" if not pts else f"[yellow]{pts[-1]['status']}[/]")
                continue
            p = max(ok, key=lambda q: q["length"])
            sp = p.get("speedup", {})
            ratio = sp.get("sdpa", sp.get("sdpa_paired"))
            cells.append(f"L={p['length']}: {_ms(p['time']['median_s'])} ms, {_x(ratio)}")
        table.add_row(escape(label), f"[green]gate {status}[/]", *cells)
    return table


def print_report(doc: ResultsDoc, console: Console, brief: bool = False) -> None:
    """The run's header (machine, threads, roof), then both tables, or with ``brief`` only one
    row per variant (:func:`brief_table`)."""
    m, roof = doc["machine"], doc.get("roof", {}).get("gflops")
    console.print(
        f"[bold]attnreg bench[/] {doc['status']} in {doc.get('elapsed_s', 0):.0f} s on {m['cpu_model']} "
        f"({m['cpu_count']} CPUs, {m['threads']} threads, torch {m['torch']}); dense GEMM roof "
        + (f"{roof:.0f} GFLOP/s" if roof else "unmeasured")
    )
    if brief:
        console.print(brief_table(doc))
        n_ok = sum(p.get("status") == "ok" for p in doc["points"])
        console.print(f"{n_ok} of {len(doc['points'])} points measured; every point is in results.json "
                      "(`attnreg bench-plot RESULTS.json --tables` prints them all)")
        return
    console.print(results_table(doc))
    console.print(summary_table(doc))
