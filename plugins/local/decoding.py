"""Incremental decoding for ``local``: a rolling buffer of the last ``window`` positions.

Query t of a decode call sits at position ``length + t`` and sees positions
``>= length + t - window``: the buffer's ``min(length, window)`` positions and the new chunk hold
all of them. So the state never grows past ``window`` positions (memory O(window)), and a step
attends to at most ``window + T`` keys whatever the context length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from attnreg.core import DecodeState, join_key_masks, zero_padded

__all__ = ["LocalState"]


@dataclass
class LocalState(DecodeState):
    """The last ``min(length, window)`` keys and values, and which of them are real tokens.

    Padded positions are kept like any other (they are positions: the window counts them), with
    ``key_mask`` False. ``key_mask`` stays None until a decode call passes one, and is kept from
    then on, so ``nbytes`` is constant once ``length >= window``.
    """

    window: int = 0
    key: Tensor | None = None  # (B, H, m, E), m = min(length, window)
    value: Tensor | None = None  # (B, H, m, Ev)
    key_mask: Tensor | None = None  # (B, m) bool, True = real token

    @property
    def buffered(self) -> int:
        """Positions held: ``min(length, window)``."""
        return 0 if self.key is None else self.key.shape[2]

    def extend(self, key: Tensor, value: Tensor, key_mask: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The buffer followed by ``T`` new positions: keys (B, H, m+T, E), values, key_mask (B, m+T).

        Padded new positions are stored as zeros (``zero_padded``): no NaN/inf stays where no
        query looks."""
        key, value = zero_padded(key, value, key_mask)  # (B, H, T, E|Ev)
        k_all = key if self.key is None else torch.cat([self.key, key], dim=2)  # (B, H, m+T, E)
        v_all = value if self.value is None else torch.cat([self.value, value], dim=2)  # (B, H, m+T, Ev)
        km = join_key_masks(self.key_mask, key_mask, self.buffered, key.shape[2])  # (B, m+T) or None
        return k_all, v_all, km

    def advanced(self, k_all: Tensor, v_all: Tensor, km: Tensor | None, t_new: int) -> LocalState:
        """The state after ``t_new`` positions: the last ``window`` of ``extend``'s result."""
        keep = min(k_all.shape[2], self.window)
        return dataclasses.replace(
            self, key=_tail(k_all, 2, keep), value=_tail(v_all, 2, keep),
            key_mask=None if km is None else _tail(km, 1, keep), length=self.length + t_new,
        )


def _tail(x: Tensor, dim: int, keep: int) -> Tensor:
    """The last ``keep`` entries along ``dim``: a view (no copy per token), copied when the view
    would pin a buffer over twice its size (after a long prefill chunk)."""
    n = x.shape[dim]
    tail = x.narrow(dim, n - keep, keep)
    return tail.clone(memory_format=torch.contiguous_format) if n > 2 * keep else tail
