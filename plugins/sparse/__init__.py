"""Built-in plugin: block-sparse softmax attention.

Two variants share one module class:

- ``sparse`` (alias ``block_sparse``): layout ``fixed`` by default (Child et al. 2019); set
  ``layout`` to ``bigbird``, ``strided``, ``fixed`` or ``custom``.
- ``bigbird``: the same with ``layout`` defaulting to ``bigbird`` (Zaheer et al. 2020). It is a
  second ``VariantSpec`` rather than an alias because an alias cannot change a default.
"""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import BigBirdAttention, SparseAttention
from .config import BigBirdConfig, SparseConfig
from .decoding import BlockKVState
from .gather import release_scratch
from .reference import sparse_reference

__all__ = [
    "BIGBIRD_SPEC",
    "BigBirdAttention",
    "BigBirdConfig",
    "BlockKVState",
    "SPEC",
    "SparseAttention",
    "SparseConfig",
    "attnreg_variants",
    "release_scratch",
    "sparse_reference",
]

SPEC = VariantSpec.of(
    SparseAttention,
    summary="exact softmax attention over a block layout (fixed, strided, bigbird, custom); "
    "computes only the active blocks",
    reference="Child et al. 2019, 'Generating Long Sequences with Sparse Transformers', "
    "arXiv:1904.10509; Zaheer et al. 2020, 'Big Bird', arXiv:2007.14062",
    aliases=("block_sparse",),
    check_configs=({"block_size": 4}, {"block_size": 3, "layout": "strided"}),  # several blocks at L>=7
)

BIGBIRD_SPEC = VariantSpec.of(
    BigBirdAttention,
    summary="block-sparse softmax attention with the BigBird layout (window + global + seeded "
    "random blocks)",
    reference="Zaheer et al. 2020, 'Big Bird: Transformers for Longer Sequences', arXiv:2007.14062",
    check_configs=({"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 1},),  # nb >= 4 at L>=7
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variants."""
    return [SPEC, BIGBIRD_SPEC]
