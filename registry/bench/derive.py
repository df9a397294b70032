"""Derived numbers of a results document: rates, speedups, scaling exponents, crossovers.

Recomputed from the raw points every time (idempotent), so a partial or re-loaded document
always carries consistent summaries.
"""

from __future__ import annotations

from .analysis import crossover, fit_exponent, median
from .cases import MASKED
from .records import PointRecord, ResultsDoc, SummaryRow

__all__ = ["derive", "point_key"]


def point_key(p: PointRecord) -> tuple[str, str, bool, int]:
    """(series, mode, causal, length): what identifies a point across runs."""
    return (p["series"], p["mode"], bool(p["causal"]), int(p["length"]))


def _t(p: PointRecord | None) -> float | None:
    if p is None or p.get("status") != "ok":
        return None
    return p["time"]["median_s"]


def derive(doc: ResultsDoc) -> ResultsDoc:
    """Fill ``tokens_per_s``, ``gflops``, ``roof_ratio`` and ``speedup`` on the points and the
    per-series ``summary`` (exponents of time and memory vs L, crossover lengths)."""
    settings = doc["settings"]
    roof = doc.get("roof", {}).get("gflops")
    fit_min = settings.get("fit_min", 0)
    points = doc["points"]
    index = {point_key(p): p for p in points if p.get("status") == "ok"}
    kv_cache = [label for label, v in doc.get("variants", {}).items() if v.get("name") == "dot_product"][:1]
    for p in points:
        t = _t(p)
        if t is None:
            continue
        p["tokens_per_s"] = settings["batch"] * p["length"] / t
        if p.get("flops"):
            p["gflops"] = p["flops"] / t / 1e9
            p["roof_ratio"] = p["gflops"] / roof if roof else None
        if p["kind"] != "variant":
            continue
        _, mode, causal, length = point_key(p)
        refs = {"sdpa": ("sdpa", mode, causal, length)}
        for masked in MASKED:
            refs[masked] = (f"{masked}[{p['series']}]", mode, causal, length)
        for b in doc["variants"].get(p["series"], {}).get("baselines", []):
            refs[b] = (f"{p['series']}:{b}", mode, causal, length)
        if mode == "decode":  # the plain KV cache's step, where dot_product was measured too
            for label in kv_cache:
                if label != p["series"]:
                    refs["dot_product"] = (label, mode, causal, length)
        speed = {name: _t(index.get(key)) / t for name, key in refs.items() if _t(index.get(key))}
        if p.get("paired", {}).get("ratios"):  # timed alternately with SDPA: the median pair ratio
            speed["sdpa_paired"] = median(p["paired"]["ratios"])
        p["speedup"] = speed
    doc["summary"] = _summary(doc, fit_min)
    return doc


def _memory(p: PointRecord) -> float | None:
    """The memory a point is judged by: a decoding state's size, else the call's peak."""
    mem = p.get("memory") or {}
    return mem.get("state_bytes") if p["mode"] == "decode" else mem.get("peak_bytes")


def _summary(doc: ResultsDoc, fit_min: int) -> list[SummaryRow]:
    groups: dict[tuple[str, str, bool], list[PointRecord]] = {}
    for p in doc["points"]:
        groups.setdefault((p["series"], p["mode"], bool(p["causal"])), []).append(p)
    rows = []
    for (series, mode, causal), pts in groups.items():
        ok = [p for p in pts if p.get("status") == "ok"]
        first = pts[0]
        row: SummaryRow = {
            "series": series, "kind": first["kind"], "variant": first.get("variant"), "mode": mode,
            "causal": causal, "measured": [p["length"] for p in ok],
            "skipped": {str(p["length"]): p.get("reason") for p in pts if p.get("status") != "ok"},
            "time_exponent": fit_exponent(((p["length"], p["time"]["median_s"]) for p in ok), fit_min),
            "memory_exponent": fit_exponent(
                ((p["length"], _memory(p)) for p in ok), fit_min),
        }
        if first["kind"] == "variant":
            for ref in ("sdpa", *MASKED):
                ratios = [(p["length"], p.get("speedup", {}).get(ref)) for p in ok]
                if any(r is not None for _, r in ratios):
                    row[f"crossover_vs_{ref}"] = crossover(ratios)
        rows.append(row)
    return rows
