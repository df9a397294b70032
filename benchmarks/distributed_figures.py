"""Draw docs/bench/distributed/patterns.png: the sequence layout and the communication pattern
of each variant under context parallelism (``docs/distributed.md``).

    python benchmarks/distributed_figures.py [--out docs/bench/distributed]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

from attnreg.core.parallel import SequenceLayout  # noqa: E402
from attnreg.plugins.dot_product.distributed import ring_blocks  # noqa: E402

P = 4
COLORS = plt.get_cmap("tab10")


def _owner(c: int) -> int:
    return c if c < P else 2 * P - 1 - c


def _sequence(ax: plt.Axes, y: float, label: str = "") -> None:
    for c in range(2 * P):
        ax.add_patch(Rectangle((c, y), 1, 0.6, facecolor=COLORS(_owner(c)), alpha=0.75, edgecolor="k"))
        ax.text(c + 0.5, y + 0.3, f"r{_owner(c)}", ha="center", va="center", fontsize=8)
    if label:
        ax.text(-0.2, y + 0.3, label, ha="right", va="center", fontsize=8)


def _arrow(ax: plt.Axes, x0: float, y0: float, x1: float, y1: float, color: Any = "k",
           rad: float = 0.35) -> None:
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color,
                                 connectionstyle=f"arc3,rad={rad}", lw=1))


def layout_panel(ax: plt.Axes) -> None:
    _sequence(ax, 0)
    for c in range(2 * P + 1):
        ax.text(c, -0.25, str(c) if c < 2 * P else "", ha="center", fontsize=7)
    ax.text(P, -0.7, "2P chunks of the sequence (positions 0 .. L-1, left to right); rank r holds "
            "chunks r and 2P-1-r", ha="center", fontsize=8)
    ax.set(xlim=(-1.2, 2 * P + 0.5), ylim=(-1, 1.1), title=f"(a) layout, P = {P}")
    ax.axis("off")


def ring_panel(ax: plt.Axes) -> None:
    lay = SequenceLayout(16 * P, P)
    index = {bounds: c for c, bounds in enumerate(lay.chunks)}
    for r in range(P):
        for src in range(P):
            for qp, kp, masked in ring_blocks(lay, lay, r, src, True, 0):
                qc, kc = index[(qp.start, qp.stop)], index[(kp.start, kp.stop)]
                ax.add_patch(Rectangle((kc, 2 * P - 1 - qc), 1, 1, facecolor=COLORS(r), alpha=0.75,
                                       hatch="///" if masked else None, edgecolor="k", lw=0.5))
                ax.text(kc + 0.5, 2 * P - 0.5 - qc, str((r - src) % P), ha="center", va="center", fontsize=7)
    ax.set(xlim=(0, 2 * P), ylim=(0, 2 * P), aspect="equal", xticks=[c + 0.5 for c in range(2 * P)],
           yticks=[c + 0.5 for c in range(2 * P)], xticklabels=range(2 * P),
           yticklabels=reversed(range(2 * P)), xlabel="key chunk", ylabel="query chunk",
           title="(b) dot_product causal: ring attention")
    ax.tick_params(labelsize=7)
    ax.text(2 * P + 0.3, P, "colour: the rank that computes the block\n(it owns the query chunk)\n"
            "number: the ring step at which the\nkey/value shard arrives (r-s -> r)\n"
            "hatched: causal mask inside the block\nwhite: in the future, skipped\n\n"
            f"every rank: {2 * P + 1} blocks ({2} masked)\nsteps: P; forward sends P-1 k/v shards,\n"
            "backward P-1 k/v + P gradient shards", fontsize=7, va="center")


def halo_panel(ax: plt.Axes) -> None:
    _sequence(ax, 0)
    for c in range(1, 2 * P):
        if _owner(c - 1) == _owner(c):
            continue  # chunks P-1 and P: the same rank, a local copy
        _arrow(ax, c - 0.35, 0.62, c + 0.35, 0.62, COLORS(_owner(c - 1)), rad=-0.7)  # w keys forward
        ax.text(c, 0.98, "w", ha="center", fontsize=7)
        _arrow(ax, c + 0.35, -0.02, c - 0.35, -0.02, COLORS(_owner(c)), rad=-0.7)  # non-causal: w back
    ax.text(P, -0.9, "each chunk receives the w keys/values (and key_mask) before it (above);\n"
            "non-causal also the w after it (below): neighbours only when w <= L / 2P.\n"
            "backward returns the halo's gradients; bytes per rank ~ 2 (1 causal) x 2 x w x (E + Ev)",
            ha="center", fontsize=8)
    ax.set(xlim=(-0.5, 2 * P + 0.5), ylim=(-1.5, 1.4), title="(c) local: halo exchange of w tokens")
    ax.axis("off")


def scan_panel(ax: plt.Axes) -> None:
    _sequence(ax, 0)
    for c in range(2 * P):
        ax.text(c + 0.5, 0.85, f"S{c}", ha="center", fontsize=7)
    for c in range(2 * P - 1):  # the prefix flows in sequence order
        _arrow(ax, c + 0.6, 0.7, c + 1.4, 0.7, "k" if c < P - 1 else "grey", rad=-0.6)
    ax.text(P / 2, 1.25, "fronts: exclusive scan over ranks", ha="center", fontsize=7)
    ax.text(1.5 * P, 1.25, "backs: all fronts + reverse scan", ha="center", fontsize=7, color="dimgrey")
    ax.text(P, -0.55, "S = sum phi(k) [v, 1]^T over a chunk (F x (Ev + 1)). causal: the state before "
            "front chunk r\n= exclusive scan of the fronts; before back chunk 2P-1-r = all fronts + "
            "reverse scan of the backs;\nnon-causal: one all-reduce. O(log P) messages of F (Ev + 1) "
            "per rank, independent of L", ha="center", va="top", fontsize=8)
    ax.set(xlim=(-0.5, 2 * P + 0.5), ylim=(-1.5, 1.4), title="(d) linear / performer: state prefix")
    ax.axis("off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/bench/distributed")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    layout_panel(fig.add_subplot(grid[0, 0]))
    halo_panel(fig.add_subplot(grid[0, 1]))
    ring_panel(fig.add_subplot(grid[1, 0]))
    scan_panel(fig.add_subplot(grid[1, 1]))
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=110)
    print("wrote", out / "patterns.png")


if __name__ == "__main__":
    main()
