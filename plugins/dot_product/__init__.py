"""Built-in plugin: scaled dot-product attention (``dot_product``; aliases ``sdpa``,
``scaled_dot_product``)."""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import DotProductAttention, DotProductConfig

__all__ = ["DotProductAttention", "DotProductConfig", "SPEC", "attnreg_variants"]

SPEC = VariantSpec.of(
    DotProductAttention,
    summary="softmax(scale * Q K^T + mask) V on torch's fused scaled_dot_product_attention",
    reference="Vaswani et al. 2017, 'Attention Is All You Need', arXiv:1706.03762",
    aliases=("sdpa", "scaled_dot_product"),
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variant."""
    return [SPEC]
