"""The decoding state of ``sparse`` / ``bigbird``: a KV cache held in whole blocks.

A decoded query reads only the key blocks its block's layout row allows, so the cache is
stored as ``(B, H, capacity, E)`` with ``capacity`` a multiple of ``block_size``: its flat
view ``(B*H*nb, block, E)`` is what the block gather indexes, without a copy per step. The
buffers are allocated once for ``max_length`` (or grown by doubling when the layout does not
depend on the total length and no ``max_length`` was given) and written in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnreg.core import DecodeState, write_key_mask, zero_padded

__all__ = ["BlockKVState"]


@dataclass
class BlockKVState(DecodeState):
    """Keys, values and key_mask of the positions so far, in buffers of whole blocks.

    Positions ``>= length`` of the buffers are zeros (key_mask True): they are never read
    unmasked, since only a query's own (diagonal) block may hold them, behind its causal mask.
    Padded positions are stored as zeros too.
    ``max_length`` fixes the layout decoding follows (the layout of that total length).
    """

    block_size: int = 1
    key: Tensor | None = None  # (B, H, capacity, E)
    value: Tensor | None = None  # (B, H, capacity, Ev)
    key_mask: Tensor | None = None  # (B, capacity) bool: False at padding; None until a key_mask is given

    @property
    def capacity(self) -> int:
        """Positions the buffers hold (a multiple of ``block_size``; 0 before the first decode)."""
        return 0 if self.key is None else self.key.shape[2]

    def write(self, key: Tensor, value: Tensor, key_mask: Tensor | None) -> BlockKVState:
        """This state with ``T`` more positions: key/value (B, H, T, E|Ev), key_mask (B, T) or None.

        Writes into the buffers in place: the state passed to ``decode`` is consumed. Autograd
        allows it: no operation saves the buffers themselves for backward (the gather copies
        the blocks it reads), so a write only adds a node to the graph.
        """
        start, t = self.length, key.shape[2]
        key, value = zero_padded(key, value, key_mask)  # (B, H, T, E|Ev): no NaN/inf kept at padding
        state = self._reserve(start + t)
        k, v = state.key, state.value  # (B, H, capacity, E|Ev)
        assert k is not None and v is not None
        k[:, :, start : start + t] = key
        v[:, :, start : start + t] = value
        km = write_key_mask(state.key_mask, key_mask, start, start + t, state.capacity)  # (B, capacity)
        return dataclasses.replace(state, key=k, value=v, key_mask=km, length=start + t)

    def _reserve(self, end: int) -> BlockKVState:
        """Buffers holding at least ``end`` positions: all of ``max_length`` at once when it is
        known, else at least doubled (amortised O(1) copy per token)."""
        if end <= self.capacity:
            return self
        b = self.block_size
        if self.max_length is not None:
            blocks = math.ceil(self.max_length / b)
        else:  # a power of two: states of different prompts share the layout tables of few sizes
            blocks = 1 << (max(math.ceil(end / b), 2 * self.capacity // b) - 1).bit_length()
        cap, n = blocks * b, self.length
        key = torch.zeros(self.batch, self.heads, cap, self.head_dim, dtype=self.dtype, device=self.device)
        value = torch.zeros(self.batch, self.heads, cap, self.value_dim, dtype=self.dtype,
                            device=self.device)
        km = None
        if self.key_mask is not None:
            km = torch.ones(self.batch, cap, dtype=torch.bool, device=self.device)  # (B, capacity)
            km[:, :n] = self.key_mask[:, :n]
        if self.key is not None and self.value is not None and n:
            key[:, :, :n] = self.key[:, :, :n]
            value[:, :, :n] = self.value[:, :, :n]
        return dataclasses.replace(self, key=key, value=value, key_mask=km)

