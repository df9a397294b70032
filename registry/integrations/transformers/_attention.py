"""The functions transformers calls for an attnreg key: the mask interface and the attention.

transformers builds one mask per forward (``create_causal_mask`` -> the mask interface) and
hands it, untouched, to the attention function of every layer. For the usual patterns (causal
or bidirectional, with a 2-D padding mask) the mask interface returns an ``AttnregMask``: a flag
and the (B, Lk) padding mask, so no variant ever gets an (L, L) tensor it does not need; the
variant applies causality itself (``is_causal``) and padding as ``key_mask``. Other patterns
(sliding window, packed sequences, custom overlays) come as transformers' dense 4-D bool mask,
for variants that take ``attn_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from attnreg.core import Attention, UnsupportedFeatureError

from ._cache import layer_of
from ._modules import attached

__all__ = ["AttnregMask", "attention_forward", "kv_heads", "mask_interface"]

# Keyword arguments some models pass to the attention function that change the attention itself.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "a model-side sliding window (choose attnreg:local instead)",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
    "output_attentions": "output_attentions=True (use attn_implementation='eager' for weights)",
}


@dataclass(frozen=True)
class AttnregMask:
    """The mask of one forward for an attnreg key: causality and padding, no (Lq, Lk) tensor.

    Keys cover positions ``0 .. kv_length-1`` of the sequence, the queries its last positions
    from ``q_offset`` on (``q_offset`` tokens are already cached).
    """

    is_causal: bool
    key_mask: Tensor | None  # (B, kv_length) bool, True = real token; None when all are real
    q_offset: int
    kv_length: int


def mask_interface(
    batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
    mask_function: Any = causal_mask_function, attention_mask: Tensor | None = None, **kwargs: Any,
) -> AttnregMask | Tensor:
    """transformers' mask interface for attnreg keys (``AttentionMaskInterface``).

    ``attention_mask`` is the 2-D padding mask (B, seen + q_length). Causal and bidirectional
    patterns give an ``AttnregMask``; any other ``mask_function`` gives transformers' dense
    (B, 1, Lq, Lk) bool mask.
    """
    q_offset = int(q_offset)
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if not plain or kv_offset != 0:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, allow_is_causal_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, kv_length) bool
    if padding is not None and bool(padding.all()):
        padding = None  # every key real: variants take their unmasked (faster) path
    return AttnregMask(mask_function is causal_mask_function, padding, q_offset, kv_length)


def kv_heads(attn: Attention, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Key/value heads as the variant takes them: Hkv heads where it declares ``grouped_query``,
    else each repeated to the query's H heads (grouped-query models such as Llama)."""
    h, hk = query.shape[1], key.shape[1]
    if h == hk or attn.capabilities.grouped_query:
        return key, value
    if h % hk:
        raise ValueError(f"query has {h} heads, key {hk}: the query heads must be a multiple")
    return key.repeat_interleave(h // hk, dim=1), value.repeat_interleave(h // hk, dim=1)  # (B, H, Lk, E)


def _read_mask(module: nn.Module, mask: object, is_causal: bool | None
               ) -> tuple[bool, Tensor | None, Tensor | None, AttnregMask | None]:
    """(is_causal, key_mask, dense attn_mask, the AttnregMask if one came)."""
    if isinstance(mask, AttnregMask):
        return mask.is_causal, mask.key_mask, None, mask
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
    if mask is None:
        return causal, None, None, None
    if isinstance(mask, Tensor) and mask.dim() == 4:
        return False, None, mask, None  # the dense mask holds the whole pattern, causality included
    got = f"a {mask.dim()}-D tensor" if isinstance(mask, Tensor) else type(mask).__name__
    raise ValueError(f"attention_mask for an attnreg attention must be the mask transformers builds "
                     f"for the model (or a 4-D (B, 1, Lq, Lk) mask), got {got}")


def _set_call_params(attn: Attention, dropout: float, scaling: float | None) -> None:
    """transformers' per-call dropout and scaling become the variant's ``dropout_p``/``scale``."""
    if dropout and not attn.capabilities.dropout:
        raise UnsupportedFeatureError(
            attn.variant, f"attention dropout ({dropout})",
            "set the model's attention dropout to 0 (e.g. attention_dropout / attn_pdrop) or call "
            "model.eval()",
        )
    attn.dropout_p = float(dropout)
    if scaling is not None:
        attn.scale = float(scaling)


def attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: object,
    dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention function for attnreg keys (``AttentionInterface``).

    query (B, H, Lq, E), key/value (B, Hkv, Lk, E) as the model's attention layer hands them
    (after its cache update); returns the output (B, Lq, H, Ev) and no weights. With a decoding
    state for this layer in the cache, key/value are only the new positions and the variant's
    ``decode`` runs; otherwise the variant's forward runs over the keys given (a KV cache's keys
    with lower-right causal alignment when Lk > Lq).
    """
    attn = attached(module)
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) not in (None, False):
            raise UnsupportedFeatureError(attn.variant, f"{what} inside transformers")
    causal, key_mask, dense, info = _read_mask(module, attention_mask, is_causal)
    _set_call_params(attn, dropout, scaling)
    state_layer = layer_of(module)
    if state_layer is not None:
        if dense is not None or not causal:
            raise UnsupportedFeatureError(attn.variant, "a dense or bidirectional mask with a decoding "
                                          "state in the cache", "only the causal + padding pattern decodes")
        out = state_layer.attend(attn, query, *kv_heads(attn, query, key, value), key_mask)
    else:
        out = _forward(attn, query, key, value, causal, key_mask, dense, info)
    return out.transpose(1, 2).contiguous(), None  # (B, Lq, H, Ev)


def _forward(attn: Attention, query: Tensor, key: Tensor, value: Tensor, causal: bool,
             key_mask: Tensor | None, dense: Tensor | None, info: AttnregMask | None) -> Tensor:
    """The variant's forward over the keys given (all of them: no cache, or a KV cache's)."""
    lq, lk = query.shape[2], key.shape[2]
    if info is not None and causal and info.q_offset + lq != lk:
        raise ValueError(
            f"the layer got {lk} keys for queries at positions {info.q_offset}..{info.q_offset + lq - 1}: "
            "attnreg needs the keys of exactly the positions so far (DynamicCache; static, sliding or "
            "offset caches are not supported)")
    if key_mask is not None and key_mask.shape[1] != lk:
        raise ValueError(f"the padding mask covers {key_mask.shape[1]} keys, the layer got {lk}")
    k, v = kv_heads(attn, query, key, value)  # (B, Hkv|H, Lk, E)
    if lq == lk or not causal:  # a dense mask (never causal) holds the whole pattern, any lengths
        return attn(query, k, v, attn_mask=dense, key_mask=key_mask, is_causal=causal)  # (B, H, Lq, Ev)
    if not attn.capabilities.decoding:
        raise UnsupportedFeatureError(
            attn.variant, "attending to transformers' KV cache (queries at the end of longer keys)",
            "it declares no decoding; generate with use_cache=False",
        )
    return attn(query, k, v, key_mask=key_mask, is_causal=True, causal_alignment="lower_right")

