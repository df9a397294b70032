"""Built-in plugin: linear attention (``linear``, alias ``linear_attention``) and the Performer
(``performer`` = linear attention with FAVOR+ features, its own spec and config because an alias
cannot change a default)."""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import LinearAttention, LinearConfig, PerformerAttention, PerformerConfig
from .decoding import LinearState

__all__ = [
    "LinearAttention",
    "LinearConfig",
    "LinearState",
    "PerformerAttention",
    "PerformerConfig",
    "SPECS",
    "attnreg_variants",
]

_KATHAROPOULOS = (
    "Katharopoulos et al. 2020, 'Transformers are RNNs: Fast Autoregressive Transformers with "
    "Linear Attention', arXiv:2006.16236"
)
_PERFORMER = "Choromanski et al. 2021, 'Rethinking Attention with Performers', arXiv:2009.14794"
_RELU = "[chunk_size=4,segment_size=8,feature_map=relu]"  # the relu entry of check_configs below

SPECS = (
    VariantSpec.of(
        LinearAttention,
        summary="phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K)); phi = elu+1 (default), relu or favor; "
        "O(L) causal via chunked prefix states; decodes with an O(1) recurrent state",
        reference=f"{_KATHAROPOULOS}; FAVOR+: {_PERFORMER}",
        aliases=("linear_attention",),
        # Several causal chunks at L >= 7, streamed two chunks per segment.
        check_configs=({"chunk_size": 4, "segment_size": 8},
                       {"chunk_size": 4, "segment_size": 8, "feature_map": "relu"},
                       {"chunk_size": 4, "segment_size": 8, "feature_map": "favor"}),
        expected_failures={f"{LinearAttention.variant}{_RELU}:rows_sum_to_one":
                           "relu features can "
                           "give a query no overlap with any key: its normaliser is 0 and its weights "
                           "row is all 0 (documented: output 0), so rows need not sum to 1 with relu"},
    ),
    VariantSpec.of(
        PerformerAttention,
        summary="linear attention with FAVOR+ positive orthogonal random features (seeded), "
        "an unbiased approximation of softmax attention",
        reference=_PERFORMER,
        check_configs=({"chunk_size": 4, "segment_size": 8},),  # several chunks and segments at L>=7
    ),
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variants."""
    return list(SPECS)
