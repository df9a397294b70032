"""Incremental decoding: the state a variant carries between calls, and its input checks.

    state = attn.init_state(batch, heads, head_dim, dtype=torch.float32)   # empty
    out, state = attn.decode(q, k, v, state, key_mask=real)                # prefill, T tokens
    out, state = attn.decode(q1, k1, v1, state)                            # one token at a time

Query t of a ``decode`` call sits at position ``state.length + t`` of the sequence and attends
causally to every position up to its own, cached or new: the outputs equal the causal full
forward over the whole sequence (with the same ``key_mask``). A state is a dataclass whose tensor
fields all have the batch as dim 0, so batch reordering (beam search) and device moves are
generic. ``decode`` may update the state's buffers in place: a state passed to ``decode`` is
consumed; branch with ``state.index_select(...)`` (which copies) before decoding two ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["DecodeState", "KVCacheState", "check_decode_inputs"]

S = TypeVar("S", bound="DecodeState")


@dataclass
class DecodeState:
    """Base of every variant's decoding state.

    ``batch``/``heads`` are the key/value batch and heads (under grouped-query attention the
    query may have a multiple of ``heads``); ``length`` counts positions consumed so far,
    padding included; ``max_length`` (None = unbounded) is the total length the state may
    reach (variants whose pattern depends on the total length, such as block layouts, need it).
    Subclasses add tensor fields, batch first; ``None`` is allowed for an absent buffer.
    """

    batch: int
    heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    length: int = 0
    max_length: int | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields (batch first), by name."""
        return {f.name: v for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), Tensor)}

    def _map(self: S, fn: Callable[[Tensor], Tensor], **changes: Any) -> S:
        new = {name: fn(t) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **new, **changes)

    def index_select(self: S, index: Tensor) -> S:
        """A new state holding batch rows ``index`` (1-D int64; rows may repeat: beam search).

        Copies every buffer, so the result and ``self`` can be decoded independently.
        """
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            got = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"index must be a 1-D integer tensor of batch rows, got {got}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch):
            raise ValueError(f"index holds rows outside [0, {self.batch}): {index.tolist()}")
        idx = index.to(self.device, torch.int64)
        return self._map(lambda t: t.index_select(0, idx), batch=int(index.numel()))

    def to(self: S, device: torch.device | str) -> S:
        """The state on ``device`` (a new object; buffers copied only where the device differs)."""
        dev = torch.device(device)
        return self._map(lambda t: t.to(dev), device=dev)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what decoding keeps between calls)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class KVCacheState(DecodeState):
    """Keys and values of every position so far, and which of them are real tokens.

    The default state of ``Attention.decode``: any causal variant whose ``_attend`` honours
    ``Masks.q_offset`` decodes with it, at O(length) memory and time per token.
    """

    key: Tensor | None = None  # (B, Hkv, T, E)
    value: Tensor | None = None  # (B, Hkv, T, Ev)
    key_mask: Tensor | None = None  # (B, T) bool, None while every position so far is real

    def append(self, key: Tensor, value: Tensor, key_mask: Tensor | None) -> KVCacheState:
        """This cache with ``T`` more positions (new buffers: O(length) copy per call)."""
        t_new = key.shape[2]
        k = key if self.key is None else torch.cat([self.key, key], dim=2)  # (B, Hkv, T', E)
        v = value if self.value is None else torch.cat([self.value, value], dim=2)  # (B, Hkv, T', Ev)
        km = self.key_mask
        if key_mask is not None or km is not None:
            old = km if km is not None else torch.ones(self.batch, self.length, dtype=torch.bool,
                                                       device=key.device)
            new = key_mask if key_mask is not None else torch.ones(self.batch, t_new, dtype=torch.bool,
                                                                  device=key.device)
            km = torch.cat([old, new], dim=1)  # (B, T')
        return dataclasses.replace(self, key=k, value=v, key_mask=km, length=self.length + t_new)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_decode_inputs(
    variant: str, state: DecodeState, query: Tensor, key: Tensor, value: Tensor,
    key_mask: Tensor | None, grouped_query: bool,
) -> None:
    """Validate one ``decode`` call against its state; ``ValueError`` naming what is wrong."""
    if not isinstance(state, DecodeState):
        raise ValueError(f"state must be a DecodeState from {variant}.init_state(...), "
                         f"got {type(state).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"decode: {name} must be a 4-D tensor (B, H, T, E), got {got}")
        if t.dtype != state.dtype or t.device != state.device:
            raise ValueError(f"decode: {name} is {t.dtype} on {t.device}, the state holds "
                             f"{state.dtype} on {state.device}")
    b, h, t_new, e = query.shape
    want_k = (state.batch, state.heads, t_new, state.head_dim)
    want_v = (state.batch, state.heads, t_new, state.value_dim)
    if tuple(key.shape) != want_k or tuple(value.shape) != want_v or t_new == 0:
        raise ValueError(
            f"decode: key {_shape(key)} / value {_shape(value)} do not match the state: expected "
            f"key {want_k} and value {want_v} (B, heads, head_dim and value_dim of init_state, "
            "T >= 1 new positions like the query)"
        )
    if b != state.batch or e != state.head_dim:
        raise ValueError(f"decode: query {_shape(query)} does not match the state (B={state.batch}, "
                         f"E={state.head_dim})")
    if h != state.heads and not (grouped_query and h % state.heads == 0):
        extra = " (or a multiple of them: this variant declares grouped_query)" if grouped_query else ""
        raise ValueError(f"decode: query has {h} heads, the state {state.heads}{extra}")
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            raise ValueError(f"decode: key_mask must be a bool tensor (B, T) = ({b}, {t_new})")
        if tuple(key_mask.shape) != (b, t_new) or key_mask.device != state.device:
            raise ValueError(f"decode: key_mask {_shape(key_mask)} on {key_mask.device} must be "
                             f"(B, T) = ({b}, {t_new}) on {state.device}")
    if state.max_length is not None and state.length + t_new > state.max_length:
        raise ValueError(f"decode: {state.length} cached + {t_new} new positions exceed the state's "
                         f"max_length {state.max_length}")
