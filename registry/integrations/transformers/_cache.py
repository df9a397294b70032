"""attnreg decoding states inside transformers' cache.

``AttnregCacheLayer`` is a transformers cache layer (``CacheLayerMixin``) that holds the
variant's own ``DecodeState`` instead of growing key/value tensors: a rolling window for
``local``, the recurrent sum for ``linear``/``performer``, a KV cache for the softmax variants.
Its ``update`` returns the new keys/values unchanged and the attention function advances the
state with ``Attention.decode``.

``generate()`` builds a ``DynamicCache`` for the model; for a model with attnreg layers, its
cache preparation (``prepare_generation_cache``, set on the model instance when the variants are
attached) then replaces the attnreg layers' empty ``DynamicLayer`` by ``AttnregCacheLayer`` s
sized for the prompt plus the new tokens. ``decoding_cache(model, max_length)`` builds such a
cache by hand. Any other cache (a ``DynamicCache`` made by the model's forward with
``use_cache=True``, one passed by the user) keeps transformers' keys and values, and the variant
attends to them with lower-right causal alignment.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    EncoderDecoderCache,
)

from attnreg.core import Attention, DecodeState, UnsupportedFeatureError

from ._compat import CACHE_KWARG, OTHER_CACHE_KWARG, PREPARE_CACHE_SIGNATURE, SUPPORTED_TRANSFORMERS

__all__ = ["AttnregCacheLayer", "decoding_cache", "forget_cache", "install_states", "layer_of",
           "prepare_generation_cache", "remember_cache"]

# Per thread: {id(HF attention module): its state layer during the current call}. Not an
# attribute of the module: threads generating with one model at once (each with its own cache)
# would read each other's layers.
_CALLS = threading.local()


def _calls() -> dict[int, AttnregCacheLayer | None]:
    calls = getattr(_CALLS, "layers", None)
    if calls is None:
        calls = _CALLS.layers = {}
    return calls


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
        self.pending = 0  # positions handed through by update() and not yet decoded

    def __repr__(self) -> str:
        return f"AttnregCacheLayer({self.variant}, state={type(self.state).__name__})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        """The new keys/values, unchanged: the attention function decodes them into the state."""
        if self.pending:
            raise RuntimeError(
                f"{self.pending} positions handed through this attnreg cache layer were never decoded: "
                f"the attention call did not find its state layer (the model must pass the cache as "
                f"{CACHE_KWARG}= to its attention module), so its output ignored the cached positions")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = key_states.shape[-2]
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
        self.pending = 0
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
                f"{CACHE_KWARG}=attnreg.integrations.transformers.decoding_cache(model, max_length="
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
        length = self.max_length if self.state is None else self.state.max_length
        return -1 if length is None else length

    def reset(self) -> None:
        self.state = None
        self.pending = 0
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
    """This module's state layer in ``cache``, or None (no cache, or a KV cache layer)."""
    if isinstance(cache, EncoderDecoderCache):
        if getattr(module, "is_cross_attention", False):
            return None
        cache = cache.self_attention_cache
    idx = getattr(module, "layer_idx", None)
    if isinstance(cache, Cache) and isinstance(idx, int) and idx < len(cache.layers):
        layer = cache.layers[idx]
        return layer if isinstance(layer, AttnregCacheLayer) else None
    return None


def install_states(model: nn.Module, cache: Cache, max_length: int | None) -> int:
    """Give every self-attention layer of ``model`` whose attnreg variant declares decoding an
    ``AttnregCacheLayer`` in ``cache`` (replacing its still-empty ``DynamicLayer``); returns
    how many. A layer that already holds positions raises: its keys would be lost."""
    layers, count = cache.layers, 0
    for m in model.modules():
        attn, idx = m._modules.get("attnreg"), getattr(m, "layer_idx", None)
        if not (isinstance(attn, Attention) and attn.capabilities.decoding and isinstance(idx, int)) \
                or getattr(m, "is_cross_attention", False):
            continue
        while len(layers) <= idx:  # a cache without a config creates its layers on first use
            layers.append(DynamicLayer())
        old = layers[idx]
        if isinstance(old, AttnregCacheLayer):
            continue
        if type(old) is not DynamicLayer:
            raise UnsupportedFeatureError(
                attn.variant, f"transformers' {type(old).__name__} (layer {idx} of the cache)",
                "attnreg keeps its state in place of a plain DynamicLayer; a sliding or chunked layer "
                "comes from the model config (e.g. sliding_window: set it to None, use attnreg:local)")
        if old.is_initialized:
            raise ValueError(f"layer {idx} of the cache already holds positions; attnreg decoding states "
                             "replace only empty layers")
        layers[idx] = AttnregCacheLayer(max_length)
        count += 1
    return count


def prepare_generation_cache(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``GenerationMixin._prepare_cache_for_generation`` for a model with attnreg layers: the
    same, then the ``DynamicCache`` generate() made for itself gets decoding states sized for
    ``max_cache_length`` (prompt + new tokens - 1). A cache passed by the user is left alone."""
    out = type(model)._prepare_cache_for_generation(model, *args, **kwargs)
    bound = PREPARE_CACHE_SIGNATURE.bind(model, *args, **kwargs).arguments
    model_kwargs, length = bound["model_kwargs"], bound["max_cache_length"]
    if OTHER_CACHE_KWARG in model_kwargs and CACHE_KWARG not in model_kwargs:  # never silently stateless
        raise RuntimeError(
            f"generate() put its cache under {OTHER_CACHE_KWARG!r}, the integration expects {CACHE_KWARG!r} "
            f"for this transformers; supported: transformers{SUPPORTED_TRANSFORMERS}")
    cache = model_kwargs.get(CACHE_KWARG)
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if isinstance(cache, Cache) and cache.is_compileable:
        variant = next((m.attnreg.variant for m in model.modules()
                        if isinstance(m._modules.get("attnreg"), Attention)), "attnreg")
        raise UnsupportedFeatureError(
            variant, f"transformers' {type(cache).__name__} (static, compileable caches)",
            "generate with the default dynamic cache (attnreg keeps each variant's own state in it)",
        )
    if isinstance(cache, DynamicCache) and not getattr(cache, "_is_user_defined", False):
        install_states(model, cache, length if length > 0 else None)
    return out


def decoding_cache(model: nn.Module, max_length: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose attnreg layers hold decoding states.

    generate() makes one itself; build it by hand for your own decoding loop
    (``model(ids, cache=cache, use_cache=True)``; ``past_key_values=cache`` before transformers
    5.24, see ``CACHE_KWARG``) or to choose ``max_length``:
    states preallocate for it, and variants whose pattern depends on the total length (sparse
    layouts with a length-derived stride, BigBird's random blocks) need it; decoding then
    follows the pattern of that length.
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"decoding_cache needs a transformers model, got {type(model).__name__}")
    cache = DynamicCache(config=config)
    install_states(model, cache, max_length)
    return cache


def remember_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module: remember its state layer for the call."""
    cache = kwargs.get(CACHE_KWARG)
    if cache is None and isinstance(kwargs.get(OTHER_CACHE_KWARG), Cache):
        raise ValueError(
            f"{type(module).__name__} got the cache as {OTHER_CACHE_KWARG}=, the keyword of another "
            f"transformers version (the installed {transformers.__version__} passes {CACHE_KWARG}=): "
            f"attnreg supports transformers{SUPPORTED_TRANSFORMERS} with model code of the installed version")
    if cache is None:  # passed positionally
        cache = next((a for a in args if isinstance(a, Cache)), None)
    _calls()[id(module)] = _state_layer(module, cache)


def forget_cache(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook (always called): the state layer is only the current call's."""
    _calls().pop(id(module), None)


def layer_of(module: nn.Module) -> AttnregCacheLayer | None:
    """The state layer of the module's current call on this thread (None: no cache, or a KV cache)."""
    return _calls().get(id(module))
