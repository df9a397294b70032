"""Built-in plugin: additive (Bahdanau) attention (``additive``; alias ``bahdanau``)."""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import AdditiveAttention, AdditiveConfig

__all__ = ["AdditiveAttention", "AdditiveConfig", "SPEC", "attnreg_variants"]

SPEC = VariantSpec.of(
    AdditiveAttention,
    summary="score = v_h . tanh(q W_q + k W_k + b), per-head parameters; query-chunked and "
    "checkpointed so memory is O(chunk*Lk*d_a)",
    reference="Bahdanau, Cho & Bengio 2015, 'Neural Machine Translation by Jointly Learning to Align "
    "and Translate', arXiv:1409.0473",
    aliases=("bahdanau",),
    check_configs=({"chunk_size": 3},),  # several query chunks (ragged last one) at L>=7
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variant."""
    return [SPEC]
