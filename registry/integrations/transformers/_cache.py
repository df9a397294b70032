"""attnreg decoding states inside transformers' cache.

``AttnregCacheLayer`` is a transformers cache layer (``CacheLayerMixin``) that holds the
variant's own ``DecodeState`` instead of growing key/value tensors: a rolling window for
``local``, the recurrent sum for ``linear``/``performer``, a KV cache for the softmax variants.
Its ``update`` returns the new keys/values unchanged and the attention function advances the
state with ``Attention.decode``.

``generate()`` builds a ``DynamicCache`` for the model; on the first call of each layer with no
autograd and in eval mode (generation), that layer's still-empty ``DynamicLayer`` is replaced by
an ``AttnregCacheLayer``. With autograd or in training mode the ``DynamicLayer`` stays, and the
variant attends to its keys with lower-right causal alignment.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    EncoderDecoderCache,
)

from attnreg.core import Attention, DecodeState, UnsupportedFeatureError

__all__ = ["AttnregCacheLayer", "decoding_cache", "forget_cache", "layer_of", "remember_cache"]

_LAYER = "_attnreg_cache_layer"  # HF attention module attribute: its state layer during a call


class AttnregCacheLayer(CacheLayerMixin):
    """One model layer's attnreg ``DecodeState`` as a transformers cache layer.

    ``get_seq_length`` is the positions consumed (padding included); beam search reorders and
    batch expansion use ``DecodeState.index_select``. Cropping (assisted decoding, contrastive
    search) is unsupported: a state cannot forget its last positions.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__()
        self.state: DecodeState | None = None
        self.max_length = max_length  # passed to init_state: the total length the sequence may reach
        self.variant = "attnreg"

    def __repr__(self) -> str:
        return f"AttnregCacheLayer({self.variant}, state={type(self.state).__name__})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        """The new keys/values, unchanged: the attention function decodes them into the state."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def attend(self, attn: Attention, query: Tensor, key: Tensor, value: Tensor,
               key_mask: Tensor | None) -> Tensor:
        """Outputs (B, H, T, Ev) of the T new positions; advances the state.

        key/value (B, Hkv|H, T, E) are the new positions only; ``key_mask`` (B, seen + T) is the
        padding mask of the whole sequence (its last T columns are the new positions').
        """
        b, _, t, e = query.shape
        if self.state is None:
            self.variant = attn.variant
            self.state = self._init_state(attn, b, key.shape[1], e, value.shape[-1], query)
        if key_mask is not None:
            if key_mask.shape[1] != self.state.length + t:
                raise ValueError(f"the padding mask covers {key_mask.shape[1]} positions, the cache "
                                 f"holds {self.state.length} and {t} are new")
            key_mask = key_mask[:, -t:]  # (B, T)
        out, self.state = attn.decode(query, key, value, self.state, key_mask=key_mask)
        return out  # (B, H, T, Ev)

    def _init_state(self, attn: Attention, batch: int, heads: int, head_dim: int, value_dim: int,
                    like: Tensor) -> DecodeState:
        try:
            return attn.init_state(batch, heads, head_dim, value_dim, dtype=like.dtype, device=like.device,
                                   max_length=self.max_length)
        except ValueError as err:
            if self.max_length is not None:
                raise
            raise ValueError(
                f"{err}. Inside transformers the cache does not know the total length: pass "
                "past_key_values=attnreg.integrations.transformers.decoding_cache(model, max_length="
                "prompt + max_new_tokens) to generate(), choose a config whose pattern does not depend "
                "on the total length, or generate with use_cache=False"
            ) from err

    @property
    def nbytes(self) -> int:
        """Bytes the state holds (0 before the first call)."""
        return 0 if self.state is None else self.state.nbytes

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        if self.state is None or self.state.max_length is None:
            return -1
        return self.state.max_length

    def reset(self) -> None:
        self.state = None
        self.is_initialized = False

    def _select(self, index: Tensor) -> None:
        if self.state is not None:
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            self.state = self.state.index_select(index.to(self.state.device, torch.int64))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch, device=self.state.device)
            self._select(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise UnsupportedFeatureError(
                self.variant, "cropping transformers' cache (assisted decoding, contrastive search)",
                "an attnreg decoding state cannot drop its last positions",
            )

    def offload(self) -> None:
        if self.state is not None:
            self.state = self.state.to("cpu")

    def prefetch(self) -> None:
        if self.state is not None and self.state.device != self.device:
            self.state = self.state.to(self.device)


def _state_layer(module: nn.Module, cache: object) -> AttnregCacheLayer | None:
    """This module's state layer in ``cache``, swapped in for a still-empty ``DynamicLayer``
    when the call runs without autograd and in eval mode; None otherwise."""
    if isinstance(cache, EncoderDecoderCache):
        if getattr(module, "is_cross_attention", False):
            return None
        cache = cache.self_attention_cache
    idx = getattr(module, "layer_idx", None)
    if not isinstance(cache, Cache) or not isinstance(idx, int):
        return None
    layers = cache.layers
    if idx < len(layers) and isinstance(layers[idx], AttnregCacheLayer):
        return layers[idx]
    attn = module._modules.get("attnreg")
    if not isinstance(attn, Attention) or not attn.capabilities.decoding:
        return None
    if module.training or torch.is_grad_enabled():
        return None
    if idx >= len(layers):
        if cache.layer_class_to_replicate is not DynamicLayer:
            return None
        while len(layers) < idx:  # what Cache.update does for the layers before this one
            layers.append(DynamicLayer())
        layers.append(AttnregCacheLayer())
        return layers[idx]
    if type(layers[idx]) is DynamicLayer and not layers[idx].is_initialized:
        layers[idx] = AttnregCacheLayer()
        return layers[idx]
    return None


def decoding_cache(model: nn.Module, max_length: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose attnreg layers hold decoding states from the start.

    Pass it as ``generate(..., past_key_values=decoding_cache(model, max_length=P + N))``:
    ``max_length`` (the prompt plus the new tokens) lets states preallocate, and is required by
    variants whose pattern depends on the total length (sparse layouts with a length-derived
    stride, BigBird's random blocks); decoding then follows the pattern of that length. Layers
    given a state here keep it with autograd or in training mode too.
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"decoding_cache needs a transformers model, got {type(model).__name__}")
    cache = DynamicCache(config=config)
    for m in model.modules():
        attn = m._modules.get("attnreg")
        idx = getattr(m, "layer_idx", None)
        if isinstance(attn, Attention) and attn.capabilities.decoding and isinstance(idx, int) \
                and not getattr(m, "is_cross_attention", False):
            if idx >= len(cache.layers):
                raise ValueError(f"the cache built from the model config has {len(cache.layers)} layers, "
                                 f"the model an attention layer {idx}")
            cache.layers[idx] = AttnregCacheLayer(max_length)
    return cache


def remember_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: find (or swap in) its state layer."""
    module.__dict__[_LAYER] = _state_layer(module, kwargs.get("past_key_values"))


def forget_cache(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook (always called): the state layer is only the current call's."""
    module.__dict__[_LAYER] = None


def layer_of(module: nn.Module) -> AttnregCacheLayer | None:
    """The state layer of the module's current call (None: no cache, or a KV cache)."""
    return module.__dict__.get(_LAYER)
