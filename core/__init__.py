"""attnreg.core: the plugin contract. Imports nothing from ``attnreg`` or ``attnreg.plugins``."""

from .cache import LRUCache, tensor_nbytes
from .capabilities import Capabilities, VariantSpec
from .config import SCALE_MAX, AttentionConfig
from .decoding import DecodeState, KVCacheState, canonical_device, join_key_masks, write_key_mask, zero_padded
from .errors import (
    AttnRegError,
    ConfigError,
    DuplicateVariantError,
    PluginLoadError,
    UnknownVariantError,
    UnsupportedFeatureError,
)
from .heads import repeat_kv
from .hooks import PROJECT_NAME, AttnregHookSpecs, hookimpl, hookspec
from .host import known
from .interface import Attention
from .masks import CausalAlignment, Masks, and_attn_mask, causal_mask, check_inputs, sdpa_safe_mask
from .nonfinite import hits_under, poison_rows, screen, screen_kv, screening_needed, span_hits
from .reference import dot_product_logits, masked_softmax, softmax_attention_reference
from .sdpa import masked_sdpa
from .seeds import mix_seed

__all__ = [
    "PROJECT_NAME",
    "Attention",
    "AttentionConfig",
    "SCALE_MAX",
    "AttnRegError",
    "AttnregHookSpecs",
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
    "and_attn_mask",
    "canonical_device",
    "causal_mask",
    "check_inputs",
    "dot_product_logits",
    "hits_under",
    "hookimpl",
    "hookspec",
    "join_key_masks",
    "known",
    "masked_sdpa",
    "masked_softmax",
    "mix_seed",
    "poison_rows",
    "repeat_kv",
    "screen",
    "screen_kv",
    "screening_needed",
    "sdpa_safe_mask",
    "softmax_attention_reference",
    "span_hits",
    "tensor_nbytes",
    "write_key_mask",
    "zero_padded",
]
