"""Draw docs/pictures/layers.png, the picture of docs/architecture.md (matplotlib).

    python docs/_tools/layers.py      (or: python docs/_tools/generate.py layers)

The picture is drawn from the lists below; edit them when a package moves, then run this again.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pictures" / "layers.png"

# (title, import name, lines of content): one box per layer, top to bottom.
REGISTRY = ("registry/", "attnreg", [
    "front door: build, get_variant, list_variants, configs (_configs.py, _config_files.py)",
    "plugin loading: entry points, isolation (_plugins.py, _plugin_env.py, _isolation.py)",
    "MultiHeadAttention (multihead.py)      context parallelism: shard, gather, launch (distributed.py)",
    "conformance/ (the suite)   bench/ (the benchmark)   cli/ (attnreg ...), pictures.py, scaffold.py",
    "integrations/transformers (attn_implementation=\"attnreg:...\")",
])
PLUGINS = ("plugins/", "attnreg.plugins.*", [
    "dot_product   additive   local   linear (+ performer)   sparse (+ bigbird)",
    "each: __init__.py (spec + hook), the fast path, reference.py (the paper)",
])
THIRD_PARTY = ("third-party plugins", "attnreg_sigmoid", [
    "any installed distribution, e.g.",
    "examples/attnreg-example-plugin:",
    "the same path as a built-in",
])
CORE = ("core/", "attnreg.core", [
    "Attention (interface.py), Capabilities / VariantSpec, AttentionConfig, errors, hookimpl",
    "masks.py + sdpa.py (masks, masked_sdpa), decoding.py (states), parallel/ (forward_sharded)",
    "shared helpers: cache.py (LRUCache), dtypes.py, seeds.py, nonfinite.py, reference.py",
])


def _box(ax, x: float, y: float, w: float, h: float, layer: tuple[str, str, list[str]], color: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    title, name, lines = layer
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc=color, ec="#333333", lw=1.2))
    ax.text(x + 0.2, y + h - 0.25, title, fontsize=11, fontweight="bold", va="top")
    ax.text(x + 0.2, y + h - 0.72, f"import {name}", fontsize=8.5, va="top", family="monospace",
            color="#555555")
    for i, line in enumerate(lines):
        ax.text(x + 0.3, y + h - 1.2 - 0.42 * i, line, fontsize=8.5, va="top")


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str,
           dashed: bool = False) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "-|>", "lw": 1.6, "color": "#333333", "linestyle": "--" if dashed else "-",
        "mutation_scale": 16})
    ax.text((start[0] + end[0]) / 2 + 0.15, (start[1] + end[1]) / 2, label, fontsize=8.5, va="center",
            style="italic", color="#333333")


def draw(path: Path = OUT) -> Path:
    """Draw the picture into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 7.6), dpi=100)
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 11.2)
    ax.axis("off")
    _box(ax, 0.3, 7.6, 15.4, 3.4, REGISTRY, "#dbe9f6")
    _box(ax, 2.2, 4.0, 8.9, 2.3, PLUGINS, "#e3f1dd")
    _box(ax, 11.5, 4.0, 4.2, 2.3, THIRD_PARTY, "#eeeeee")
    _box(ax, 0.3, 0.3, 15.4, 2.6, CORE, "#fbe6cf")
    # Who imports whom: every arrow points at what is imported or loaded.
    _arrow(ax, (1.0, 7.6), (1.0, 2.95), "imports")
    _arrow(ax, (6.3, 7.6), (6.3, 6.35), "", dashed=True)
    _arrow(ax, (13.4, 7.6), (13.4, 6.35), "", dashed=True)
    ax.text(6.5, 6.95, "loads plugins through entry points (group \"attnreg\"),\nnever imports them",
            fontsize=8.5, va="center", style="italic", color="#333333")
    _arrow(ax, (6.3, 4.0), (6.3, 2.95), "imports only attnreg.core")
    _arrow(ax, (13.4, 4.0), (13.4, 2.95), "imports only attnreg.core")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(draw())
