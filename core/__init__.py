"""attnreg.core: the plugin contract, and everything a plugin author needs to write a variant.

Imports nothing from ``attnreg`` or ``attnreg.plugins``. ``__all__`` is the author's surface:
the base classes (``Attention`` with its optional benchmark hooks, ``AttentionConfig``), the
declaration (``Capabilities``, ``VariantSpec``, ``hookimpl``), the canonical masks and input
checks, decoding states, the errors, and the helpers the built-in variants share (dense
reference math, non-finite screening, caches, dtypes).
"""

from ._hooks import hookimpl
from .bench_hooks import Baseline
from .cache import LRUCache, tensor_nbytes
from .capabilities import Capabilities, VariantSpec
from .config import SCALE_MAX, AttentionConfig
from .decoding import DecodeState, KVCacheState, join_key_masks, write_key_mask, zero_padded
from .dtypes import accum_dtype
from .errors import (
    AttnRegError,
    ConfigError,
    DuplicateVariantError,
    PluginLoadError,
    UnknownVariantError,
    UnsupportedFeatureError,
)
from .heads import repeat_kv
from .host import known
from .interface import Attention
from .masks import CausalAlignment, Masks, and_attn_mask, causal_mask, check_inputs, sdpa_safe_mask
from .nonfinite import hits_under, poison_rows, screen, screen_kv
from .reference import dot_product_logits, masked_softmax, softmax_attention_reference
from .sdpa import masked_sdpa
from .seeds import mix_seed

__all__ = [
    "Attention",
    "AttentionConfig",
    "SCALE_MAX",
    "AttnRegError",
    "Baseline",
    "Capabilities",
    "CausalAlignment",
    "ConfigError",
    "DecodeState",
    "DuplicateVariantError",
    "KVCacheState",
    "LRUCache",
    "Masks",
    "PluginLoadError",
    "UnknownVariantError",
    "UnsupportedFeatureError",
    "VariantSpec",
    "accum_dtype",
    "and_attn_mask",
    "causal_mask",
    "check_inputs",
    "dot_product_logits",
    "hits_under",
    "hookimpl",
    "join_key_masks",
    "known",
    "masked_sdpa",
    "masked_softmax",
    "mix_seed",
    "poison_rows",
    "repeat_kv",
    "screen",
    "screen_kv",
    "sdpa_safe_mask",
    "softmax_attention_reference",
    "tensor_nbytes",
    "write_key_mask",
    "zero_padded",
]
