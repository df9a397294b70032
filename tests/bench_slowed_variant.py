"""A deliberately slowed ``local`` for the speed-guard test (importable: the bench measures it in a
fresh process). Same results, the regression a refactor could bring: a dense (L, L) mask that
sends every query block to SDPA with its own gathered 4-D mask (off the shared-band fast path)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnreg.core import Masks, VariantSpec
from attnreg.plugins.local import LocalAttention, LocalConfig


class SlowedLocal(LocalAttention):
    """``local`` computing exactly the same band, through its slow per-block-mask path."""

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        everything = torch.ones(1, 1, masks.q_len, masks.k_len, dtype=torch.bool)  # (1, 1, Lq, Lk)
        return super()._attend(query, key, value, dataclasses.replace(masks, attn_mask=everything))


SLOWED_SPEC = VariantSpec(
    name="local", config=LocalConfig, factory=SlowedLocal, capabilities=SlowedLocal.capabilities,
    summary="local, slowed on purpose (per-block masks)", reference="test only",
)
