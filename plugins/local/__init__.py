"""Built-in plugin: local (sliding-window) attention (``local``; aliases ``sliding_window``,
``window``)."""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import LocalAttention, LocalConfig

__all__ = ["SPEC", "LocalAttention", "LocalConfig", "attnreg_variants"]

SPEC = VariantSpec.of(
    LocalAttention,
    summary="softmax attention over |i - j| <= window, blocked over SDPA: O(L*w) time and memory",
    reference="Beltagy et al. 2020, 'Longformer: The Long-Document Transformer', arXiv:2004.05150 "
    "(sliding-window attention); Child et al. 2019 (local attention)",
    aliases=("sliding_window", "window"),
    check_configs=({"window": 2, "block_size": 4}, {"window": 3, "block_size": 5}),  # blocked path at L>=13
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variant."""
    return [SPEC]
