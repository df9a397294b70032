"""The one attention interface every variant implements (SDPA's calling convention)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .bench_hooks import BenchmarkHooks
from .capabilities import Capabilities
from .config import AttentionConfig, declared_variant
from .decoding import DecodeState, KVCacheState, canonical_device, check_decode_inputs, freeze_fingerprint
from .dtypes import accum_dtype
from .errors import UnsupportedFeatureError
from .masks import CausalAlignment, Masks, check_inputs
from .second_order import guard_second_order

__all__ = ["Attention"]


class Attention(BenchmarkHooks, nn.Module):
    """Base class of every attention variant.

    Subclasses set the class attributes ``config_class`` (their ``AttentionConfig`` subclass,
    whose ``variant: Literal["name"]`` is the variant's name: ``variant`` is derived from it)
    and ``capabilities``, and implement ``_attend`` and ``_weights``; this class validates
    inputs, canonicalises masks and rejects undeclared features, so that variants never
    re-implement it. ``VariantSpec.of(cls, summary=..., reference=...)`` registers the class.
    The optional benchmark hooks (``pattern_mask``, ``flops``, ``benchmark_baselines``) are
    documented on ``BenchmarkHooks``.

        out = attn(query, key, value, attn_mask=None, key_mask=None, is_causal=False)
        w   = attn.attention_weights(query, key, ...)          # dense (B, H, Lq, Lk)
        state = attn.init_state(B, H, E)                       # where capabilities.decoding
        out, state = attn.decode(query, key, value, state)     # the next T positions
        out = attn.forward_sharded(q, k, v, group=pg)          # where capabilities.context_parallel

    ``causal_alignment="lower_right"`` (with ``is_causal``) says the queries are the last Lq
    positions of the keys' sequence; variants see it as ``masks.q_offset``. The default decoding
    state is a KV cache over ``_attend`` with that offset; variants with a cheaper state
    (a rolling window, a recurrent sum) override ``_init_state`` and ``_decode``.
    """

    variant: ClassVar[str] = "attention"
    config_class: ClassVar[type[AttentionConfig] | None] = None
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive ``variant`` from ``config_class``. A class that sets ``variant`` itself (the
        explicit form, registered with ``VariantSpec(name=..., config=...)``) has no
        ``config_class`` of its own."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "config_class" not in own:
            if "variant" in own:
                cls.config_class = None  # an inherited config names another variant
            return
        config = own["config_class"]
        if config is None:  # explicitly none: the explicit form
            return
        if "variant" in own:
            raise TypeError(f"{cls.__qualname__} sets both config_class and variant: the name is "
                            f"declared once, as the config's variant: Literal[\"name\"]; drop variant")
        if not (isinstance(config, type) and issubclass(config, AttentionConfig)):
            raise TypeError(f"{cls.__qualname__}.config_class must be a subclass of AttentionConfig, "
                            f"got {config!r}")
        name = declared_variant(config)
        if name is None:
            raise TypeError(f"{cls.__qualname__}.config_class {config.__name__} must declare its variant "
                            f"as one name, variant: Literal[\"name\"], got "
                            f"{config.model_fields['variant'].annotation!r}")
        cls.variant = name

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"{type(self).__name__} needs an AttentionConfig, got {config!r}")
        if self.config_class is not None and not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        if config.dropout > 0 and not self.capabilities.dropout:
            raise UnsupportedFeatureError(self.variant, f"dropout={config.dropout}")
        self.config = config
        self.dropout_p = config.dropout
        self.scale = config.scale

    def softmax_scale(self, head_dim: int) -> float:
        """The logit multiplier: the configured ``scale`` or 1/sqrt(E)."""
        return self.scale if self.scale is not None else head_dim**-0.5

    @property
    def active_dropout(self) -> float:
        """Dropout probability in force now (0 in eval mode)."""
        return self.dropout_p if self.training else 0.0

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *, attn_mask: Tensor | None = None,
                key_mask: Tensor | None = None, is_causal: bool = False,
                causal_alignment: CausalAlignment = "upper_left") -> Tensor:
        """Output (B, H, Lq, Ev) for query (B, H, Lq, E), key (B, H, Lk, E), value (B, H, Lk, Ev)."""
        if value is None:
            raise ValueError("value must be a torch.Tensor (B, H, Lk, Ev), got None")
        masks = check_inputs(
            self.variant, self.capabilities, query, key, value, attn_mask, key_mask, is_causal,
            causal_alignment,
        )
        if not self.capabilities.double_backward:
            query, key, value = guard_second_order(self.variant, query, key, value)
        return self._attend(query, key, value, masks)

    def attention_weights(self, query: Tensor, key: Tensor, *, attn_mask: Tensor | None = None,
                          key_mask: Tensor | None = None, is_causal: bool = False,
                          causal_alignment: CausalAlignment = "upper_left") -> Tensor:
        """Dense weights (B, H, Lq, Lk) with ``forward == attention_weights @ value`` (no dropout)."""
        masks = check_inputs(
            self.variant, self.capabilities, query, key, None, attn_mask, key_mask, is_causal,
            causal_alignment,
        )
        return self._weights(query, key, masks)

    # -- context parallelism ----------------------------------------------------------------
    def forward_sharded(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        group: Any = None,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
        causal_alignment: CausalAlignment = "upper_left",
    ) -> Tensor:
        """This process's shard of the output, for this process's shards of query, key, value.

        The sequences are split over the processes of ``group`` (a ``torch.distributed`` process
        group; None = the default one) as ``attnreg.core.parallel.SequenceLayout`` says, and so
        is ``key_mask``; every process calls with its shards, the same flags and the same module.
        The result (and its gradients) equal the shards of ``forward`` on the whole sequences.
        Needs ``capabilities.context_parallel``; ``attn_mask`` and dropout are not supported.
        """
        from .parallel import run_sharded  # torch.distributed is imported only when used

        return run_sharded(self, query, key, value, group, attn_mask, key_mask, is_causal,
                           causal_alignment)

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: Any) -> Tensor:
        """The distributed form of ``_attend``: ``masks`` holds the local ``key_mask`` and the
        global causal offset, ``ctx`` an ``attnreg.core.parallel.ShardContext``."""
        raise UnsupportedFeatureError(self.variant,
                                      "context parallelism (forward_sharded under a process group)")

    # -- incremental decoding ---------------------------------------------------------------
    def init_state(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        max_length: int | None = None,
    ) -> DecodeState:
        """An empty decoding state for ``batch`` sequences of ``heads`` key/value heads.

        ``value_dim`` defaults to ``head_dim``; ``max_length`` bounds the total length (cached
        plus new positions; variants whose pattern depends on it require it).
        """
        if not self.capabilities.decoding:
            raise UnsupportedFeatureError(self.variant, "decoding (init_state / decode)")
        value_dim = head_dim if value_dim is None else value_dim
        for name, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                          ("value_dim", value_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"init_state: {name} must be an integer >= 1, got {val!r}")
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise ValueError(f"init_state: max_length must be None or an integer >= 1, got {max_length!r}")
        if not isinstance(dtype, torch.dtype) or dtype not in self.capabilities.dtypes:
            raise UnsupportedFeatureError(self.variant, f"dtype {dtype}",
                                          f"supported: {self.capabilities.dtypes}")
        dev = canonical_device(device)  # "cpu:0" / "cuda" as their tensors report it
        state = self._init_state(batch, heads, head_dim, value_dim, dtype, dev, max_length)
        state.variant, state.fingerprint = self.variant, freeze_fingerprint(self._state_fingerprint())
        return state

    def decode(
        self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState, *,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, DecodeState]:
        """Outputs (B, H, T, Ev) of the next T positions and the updated state.

        query (B, H, T, E), key (B, Hkv, T, E), value (B, Hkv, T, Ev); ``key_mask`` (B, T) bool,
        True = real token (left padding is the usual case). Query t sees positions
        ``<= state.length + t``. ``state`` is consumed (its buffers may be reused).
        """
        if not self.capabilities.decoding:
            raise UnsupportedFeatureError(self.variant, "decoding (init_state / decode)")
        check_decode_inputs(self.variant, state, query, key, value, key_mask,
                            self.capabilities.grouped_query, freeze_fingerprint(self._state_fingerprint()))
        if not self.capabilities.double_backward:
            query, key, value = guard_second_order(self.variant, query, key, value)
        return self._decode(query, key, value, state, key_mask)

    def _state_fingerprint(self) -> dict[str, Any]:
        """The config fields a decoding state of this module depends on beyond its sizes (a
        window, feature map, layout...): ``decode`` refuses a state made by a module of another
        variant or with other values of them. Empty for a plain KV cache (raw keys and values)."""
        return {}

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int,
                    dtype: torch.dtype, device: torch.device, max_length: int | None) -> DecodeState:
        return KVCacheState(batch, heads, head_dim, value_dim, dtype, device, max_length=max_length)

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, DecodeState]:
        if not isinstance(state, KVCacheState):
            raise ValueError(f"decode: {self.variant} needs the state of its own init_state, "
                             f"got {type(state).__name__}")
        in_place = not self.records_graph(query, key, value, *state.tensors().values())
        state = state.append(key, value, key_mask, in_place=in_place)
        assert state.key is not None and state.value is not None
        # The T new queries are the last positions of the cached keys: lower-right causal.
        masks = check_inputs(self.variant, self.capabilities, query, state.key, state.value, None,
                             state.key_mask, True, "lower_right")
        masks = dataclasses.replace(masks, padding_zeroed=True)  # append zeroed the padding
        return self._attend_cached(query, state, masks), state  # (B, H, T, Ev)

    def _attend_cached(self, query: Tensor, state: KVCacheState, masks: Masks) -> Tensor:
        """The default decode's attention of the new queries over the whole cache (``masks``:
        lower-right causal, the cache's key_mask). Override where the result depends on more
        than the keys so far (e.g. on ``state.max_length``)."""
        assert state.key is not None and state.value is not None
        return self._attend(query, state.key, state.value, masks)  # (B, H, T, Ev)

    def records_graph(self, *tensors: Tensor) -> bool:
        """Whether autograd records a call on ``tensors``: grad mode is on and one of them or
        one of this module's parameters requires grad. A decoding state's buffers may then be
        saved for backward, so ``decode`` must not write into them in place."""
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _attend")

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _weights")

    def extra_repr(self) -> str:
        fields = self.config.model_dump(exclude={"variant"})
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())

    # Plugins published before ``attnreg.core.accum_dtype`` existed call this name.
    _accum_dtype = staticmethod(accum_dtype)
