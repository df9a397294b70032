"""The one attention interface every variant implements (SDPA's calling convention)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .capabilities import Capabilities
from .config import AttentionConfig
from .errors import UnsupportedFeatureError
from .masks import Masks, check_inputs

__all__ = ["Attention"]


class Attention(nn.Module):
    """Base class of every attention variant.

    Subclasses set the class attributes ``variant`` (registered name) and ``capabilities``, and
    implement ``_attend`` and ``_weights``; this class validates inputs, canonicalises masks and
    rejects undeclared features, so that variants never re-implement it.

        out = attn(query, key, value, attn_mask=None, key_mask=None, is_causal=False)
        w   = attn.attention_weights(query, key, ...)          # dense (B, H, Lq, Lk)
    """

    variant: ClassVar[str] = "attention"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"{type(self).__name__} needs an AttentionConfig, got {config!r}")
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

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Output (B, H, Lq, Ev) for query (B, H, Lq, E), key (B, H, Lk, E), value (B, H, Lk, Ev)."""
        if value is None:
            raise ValueError("value must be a torch.Tensor (B, H, Lk, Ev), got None")
        masks = check_inputs(
            self.variant, self.capabilities, query, key, value, attn_mask, key_mask, is_causal
        )
        return self._attend(query, key, value, masks)

    def attention_weights(
        self,
        query: Tensor,
        key: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Dense weights (B, H, Lq, Lk) with ``forward == attention_weights @ value`` (no dropout)."""
        masks = check_inputs(
            self.variant, self.capabilities, query, key, None, attn_mask, key_mask, is_causal
        )
        return self._weights(query, key, masks)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _attend")

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _weights")

    def extra_repr(self) -> str:
        fields = self.config.model_dump(exclude={"variant"})
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())

    @staticmethod
    def _accum_dtype(x: Tensor) -> torch.dtype:
        """float32 for half inputs (softmax and normalisers), the input dtype otherwise."""
        return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
