"""PNG plots of a results document (matplotlib, from the ``plot`` extra).

``time.png`` and ``memory.png``: log-log against L, one panel per (mode, causal), one solid line
per variant labelled with its fitted exponent; dense SDPA dashed black, the SDPA-with-the-
variant's-mask baseline dashed in the variant's colour, the variant's own baselines dotted.
Each panel's legend sits to its right, outside the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._plotting import pyplot
from .records import ResultsDoc

__all__ = ["plot_results", "results_figure"]


def _panels(doc: ResultsDoc) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []
    for p in doc["points"]:
        key = (p["mode"], bool(p["causal"]))
        if key not in seen:
            seen.append(key)
    return sorted(seen)


def _series_points(doc: ResultsDoc, mode: str, causal: bool,
                   metric: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for p in doc["points"]:
        if p["mode"] != mode or bool(p["causal"]) != causal or p.get("status") != "ok":
            continue
        mem = p.get("memory") or {}
        # Decoding: the memory that matters is what the state keeps between tokens.
        y = p["time"]["median_s"] if metric == "time" else mem.get("state_bytes", mem.get("peak_bytes"))
        if y:
            out.setdefault(p["series"], []).append((p["length"], y / (1 if metric == "time" else 2**20)))
    return {k: sorted(v) for k, v in out.items()}


_METRICS = {"time": ("seconds", "time_exponent"), "memory": ("peak MiB", "memory_exponent")}


def results_figure(doc: ResultsDoc, metric: str) -> Any:
    """The matplotlib figure of ``metric`` ("time" or "memory"): one panel per (mode, causal),
    each with its legend to the right of the panel, outside the data."""
    plt = pyplot()
    unit, fit_key = _METRICS[metric]
    kinds = {p["series"]: (p["kind"], p.get("variant")) for p in doc["points"]}
    fits = {(r["series"], r["mode"], r["causal"]): r for r in doc.get("summary", [])}
    labels = list(doc.get("variants", {}))
    cmap = plt.get_cmap("tab10")
    colour = {label: cmap(i % 10) for i, label in enumerate(labels)}
    panels = _panels(doc) or [("fwd", False)]
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    # Constrained layout keeps each panel's outside legend clear of its neighbour.
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, 5.0 * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (mode, causal) in zip(axes.flat, panels, strict=False):
        for series, pts in _series_points(doc, mode, causal, metric).items():
            kind, variant = kinds[series]
            fit = (fits.get((series, mode, causal)) or {}).get(fit_key)
            label = series + (f"  (L^{fit['exponent']:.2f})" if fit else "")
            style = {"variant": dict(ls="-", marker="o", color=colour.get(variant)),
                     "sdpa": dict(ls="--", marker="x", color="black", lw=1.8),
                     "sdpa_masked": dict(ls="--", marker="s", color=colour.get(variant), alpha=0.7),
                     "sdpa_masked_bool": dict(ls="-.", marker="d", color=colour.get(variant), alpha=0.5),
                     "baseline": dict(ls=":", marker="^", color=colour.get(variant), alpha=0.7)}[kind]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=label, ms=4, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens in the state)" if mode == "decode" else "sequence length L")
        ax.set_ylabel("state MiB" if mode == "decode" and metric == "memory" else unit)
        ax.set_title(f"{metric}: {mode}{' causal' if causal else ''}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    m = doc.get("machine", {})
    s = doc.get("settings", {})
    fig.suptitle(f"attnreg bench ({doc.get('status')}): B={s.get('batch')} H={s.get('heads')} "
                 f"E={s.get('head_dim')} {s.get('dtype')}, {m.get('cpu_model')}, "
                 f"{m.get('threads')} threads, torch {m.get('torch')}", fontsize=9)
    return fig


def plot_results(doc: ResultsDoc, out_dir: Path) -> list[Path]:
    """Write ``time.png`` and ``memory.png`` under ``out_dir``; return their paths."""
    plt = pyplot()
    paths = []
    for metric in _METRICS:
        fig = results_figure(doc, metric)
        path = Path(out_dir) / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
