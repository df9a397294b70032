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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["DecodeState", "KVCacheState", "canonical_device", "check_decode_inputs", "freeze_fingerprint",
           "join_key_masks", "write_key_mask", "zero_padded"]

S = TypeVar("S", bound="DecodeState")


def canonical_device(device: torch.device | str | None) -> torch.device:
    """The device tensors created on ``device`` report: ``cpu:0`` -> ``cpu``, ``cuda`` ->
    ``cuda:<current>``. States store it so that ``t.device == state.device`` holds for their
    tensors. ``ValueError`` for a malformed device or one this torch cannot use."""
    try:
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cpu":
            return torch.device("cpu")
        if dev.index is not None:
            return dev
        return torch.empty(0, device=dev).device  # the backend's current index
    except (RuntimeError, AssertionError) as err:  # torch's errors for "cuda" without CUDA, "foo"
        raise ValueError(f"device {device!r} is not usable here: {err}") from None


@dataclass
class DecodeState:
    """Base of every variant's decoding state.

    ``batch``/``heads`` are the key/value batch and heads (under grouped-query attention the
    query may have a multiple of ``heads``); ``length`` counts positions consumed so far,
    padding included; ``max_length`` (None = unbounded) is the total length the state may
    reach (variants whose pattern depends on the total length, such as block layouts, need it).
    ``variant`` and ``fingerprint`` (the config fields that give the state its meaning, as
    sorted ``(name, value)`` pairs) are set by ``Attention.init_state``: ``decode`` accepts the
    state only from a module with the same variant and fingerprint.
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
    variant: str = ""
    fingerprint: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        self.device = canonical_device(self.device)

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
        dev = canonical_device(device)
        return self._map(lambda t: t.to(dev), device=dev)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what decoding keeps between calls)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class KVCacheState(DecodeState):
    """Keys and values of every position so far, and which of them are real tokens.

    The default state of ``Attention.decode``: any causal variant whose ``_attend`` honours
    ``Masks.q_offset`` decodes with it, at O(length) memory and time per token. The buffers have
    room for ``capacity`` positions (``max_length`` when given, else doubled as needed), so a step
    writes only its new positions instead of copying the whole cache; ``key``, ``value`` and
    ``key_mask`` are views of the first ``length`` positions.
    """

    key_buffer: Tensor | None = None  # (B, Hkv, capacity, E)
    value_buffer: Tensor | None = None  # (B, Hkv, capacity, Ev)
    mask_buffer: Tensor | None = None  # (B, capacity) bool; None while every position is real

    @property
    def key(self) -> Tensor | None:
        """Cached keys (B, Hkv, length, E), a view of the buffer (None before the first call)."""
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.length]

    @property
    def value(self) -> Tensor | None:
        """Cached values (B, Hkv, length, Ev), a view of the buffer."""
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.length]

    @property
    def key_mask(self) -> Tensor | None:
        """(B, length) bool, True = real token; None while every position so far is real."""
        return None if self.mask_buffer is None else self.mask_buffer[:, : self.length]

    @property
    def capacity(self) -> int:
        """Positions the buffers hold room for."""
        return 0 if self.key_buffer is None else self.key_buffer.shape[2]

    def append(self, key: Tensor, value: Tensor, key_mask: Tensor | None, *,
               in_place: bool | None = None) -> KVCacheState:
        """This cache with ``T`` more positions.

        ``in_place=True`` writes into the buffers when they have room (the state passed to
        ``decode`` is consumed) and grows them otherwise: O(T) per call. ``in_place=False``
        concatenates into new buffers, O(length) per call: required whenever the previous call
        may have recorded an autograd graph, since that graph saved views of the buffers for
        backward and an in-place write would invalidate them (query, key, value, a module
        parameter or the cache itself requiring grad, with grad mode on: see
        ``Attention.records_graph``). ``None`` (the default) writes in place only when grad
        mode is off, which is always safe.
        """
        end = self.length + key.shape[2]
        key, value = zero_padded(key, value, key_mask)  # (B, Hkv, T, E|Ev)
        if in_place is None:
            in_place = not torch.is_grad_enabled()
        if not in_place:
            return self._concat(key, value, key_mask)
        kb, vb, mb = self.key_buffer, self.value_buffer, self.mask_buffer
        if kb is None or vb is None or end > kb.shape[2]:
            cap = self.max_length if self.max_length is not None else max(end, 2 * self.capacity, 16)
            kb, vb = _grow(kb, cap, key), _grow(vb, cap, value)
            mb = None if mb is None else _grow(mb, cap, None)
        kb[:, :, self.length:end] = key  # (B, Hkv, T, E) into the free positions
        vb[:, :, self.length:end] = value
        mb = write_key_mask(mb, key_mask, self.length, end, kb.shape[2])  # (B, capacity) or None
        return dataclasses.replace(self, key_buffer=kb, value_buffer=vb, mask_buffer=mb, length=end)

    def _concat(self, key: Tensor, value: Tensor, key_mask: Tensor | None) -> KVCacheState:
        old_k, old_v = self.key, self.value
        k = key if old_k is None else torch.cat([old_k, key], dim=2)  # (B, Hkv, T', E)
        v = value if old_v is None else torch.cat([old_v, value], dim=2)  # (B, Hkv, T', Ev)
        m = join_key_masks(self.key_mask, key_mask, self.length, key.shape[2])  # (B, T') or None
        return dataclasses.replace(self, key_buffer=k, value_buffer=v, mask_buffer=m,
                                   length=self.length + key.shape[2])


def zero_padded(key: Tensor, value: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``key``/``value`` (B, H, T, E|Ev) with the padded positions (``key_mask`` (B, T) False) set
    to 0. Decoding states store them so: no NaN or inf is kept where no query looks, and the
    attention over the state need not screen the padding (``Masks.padding_zeroed``)."""
    if key_mask is None:
        return key, value
    pad = ~key_mask[:, None, :, None]  # (B, 1, T, 1)
    return key.masked_fill(pad, 0.0), value.masked_fill(pad, 0.0)


def join_key_masks(old: Tensor | None, new: Tensor | None, old_len: int, new_len: int) -> Tensor | None:
    """The key mask (B, old_len + new_len) bool of ``old_len`` positions followed by ``new_len``
    more, from the masks of each part (None: every position of that part is real). None while
    both are: states keep no mask until one is given."""
    if old is None and new is None:
        return None
    like = new if old is None else old
    b, dev = like.shape[0], like.device
    old = torch.ones(b, old_len, dtype=torch.bool, device=dev) if old is None else old  # (B, old_len)
    new = torch.ones(b, new_len, dtype=torch.bool, device=dev) if new is None else new  # (B, new_len)
    return torch.cat([old, new], dim=1)


def write_key_mask(buffer: Tensor | None, key_mask: Tensor | None, start: int, stop: int,
                   capacity: int) -> Tensor | None:
    """A key-mask buffer (B, capacity) bool whose positions [start, stop) now hold ``key_mask``
    (B, stop - start), written in place; None (every position real) while no mask has been
    given, allocated all True at the first one."""
    if key_mask is None:
        if buffer is not None:
            buffer[:, start:stop] = True
        return buffer
    if buffer is None:
        buffer = torch.ones(key_mask.shape[0], capacity, dtype=torch.bool, device=key_mask.device)
    buffer[:, start:stop] = key_mask
    return buffer


def _grow(buf: Tensor | None, capacity: int, like: Tensor | None) -> Tensor:
    """A buffer of ``capacity`` positions (dim 2, or dim 1 for a (B, T) mask) holding ``buf``."""
    if buf is None:
        assert like is not None
        shape = (*like.shape[:2], capacity, *like.shape[3:])
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    dim = 2 if buf.dim() == 4 else 1
    shape = list(buf.shape)
    old, shape[dim] = shape[dim], capacity
    new = torch.ones(shape, dtype=buf.dtype, device=buf.device) if buf.dtype == torch.bool else \
        torch.empty(shape, dtype=buf.dtype, device=buf.device)
    new.narrow(dim, 0, old).copy_(buf)
    return new


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def freeze_fingerprint(fields: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``fields`` as the sorted ``(name, value)`` pairs a state stores in ``fingerprint``."""
    return tuple(sorted(fields.items()))


def _describe(variant: str, fingerprint: tuple[tuple[str, Any], ...]) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in fingerprint)
    return (variant or "no init_state (variant unset)") + (f" ({fields})" if fields else "")


def check_decode_inputs(
    variant: str, state: DecodeState, query: Tensor, key: Tensor, value: Tensor,
    key_mask: Tensor | None, grouped_query: bool, fingerprint: tuple[tuple[str, Any], ...] = (),
) -> None:
    """Validate one ``decode`` call against its state; ``ValueError`` naming what is wrong.

    ``fingerprint`` is the decoding module's (``freeze_fingerprint``): the state must come from
    a module of the same ``variant`` and fingerprint.
    """
    if not isinstance(state, DecodeState):
        raise ValueError(f"state must be a DecodeState from {variant}.init_state(...), "
                         f"got {type(state).__name__}")
    if state.variant != variant or state.fingerprint != fingerprint:
        names = [k for k, _ in fingerprint]
        same = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
        raise ValueError(
            f"decode: {_describe(variant, fingerprint)} needs the state of its own init_state (or of "
            f"another {variant} module{' with the same ' + same if same else ''}), got a "
            f"{type(state).__name__} made by {_describe(state.variant, state.fingerprint)}"
        )
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
