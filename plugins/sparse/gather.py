"""Gathering blocks and mask entries for the block-sparse fast path.

``gather_rows`` is ``index_select`` on dim 0 with a one-pass ``index_add_`` backward;
``Scratch`` (owned by each module) reuses the gather buffers when autograd does not keep them;
the mask helpers pick out of a 4-D ``attn_mask`` exactly the entries that one group of query
blocks reads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .plan import FullGroup, Group, Plan

__all__ = [
    "Gatherer", "Scratch", "full_rows_attn_mask", "gather_attn_mask", "gather_rows",
    "release_scratch",
]


class Scratch:
    """Gather buffers owned by one module instance, reused when autograd does not keep them.

    A fresh multi-MB buffer per call costs page faults comparable to the copy itself on CPU, so
    inference calls reuse the buffers of the largest gather so far (inference gathers a few rows
    at a time: about 8 MB). They belong to the module that owns this object:
    they are freed with it (or by ``clear()``), never appear in ``state_dict``, and a copied or
    pickled module starts with an empty scratch. One thread at a time uses them (``lease``); a
    concurrent call on the same module allocates fresh buffers instead of waiting.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[Scratch], tuple[()]]:
        # deepcopy / pickle of the owning module: buffers (and the lock) are not state.
        return (Scratch, ())

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Free the buffers (they are re-created on demand)."""
        with self._lock:
            self._buffers.clear()

    @contextmanager
    def lease(self, reuse: bool) -> Iterator[Gatherer]:
        """A gatherer that writes into these buffers while the ``with`` block runs, if ``reuse``
        and no other thread holds them; otherwise one that allocates per call."""
        if not reuse or not self._lock.acquire(blocking=False):
            yield Gatherer(None)
            return
        try:
            yield Gatherer(self._buffers)
        finally:
            self._lock.release()


class Gatherer:
    """``gather`` for one forward call: into ``store``'s buffers, or plain ``gather_rows``."""

    def __init__(self, store: dict[tuple[str, torch.dtype], Tensor] | None) -> None:
        self._store = store

    def gather(self, name: str, src: Tensor, index: Tensor) -> Tensor:
        """``src.index_select(0, index)``, into a reused buffer where allowed."""
        if self._store is None or src.device.type != "cpu":  # CUDA has its own caching allocator
            return gather_rows(src, index)
        shape = (index.shape[0], *src.shape[1:])
        need = math.prod(shape)
        key = (name, src.dtype)
        buf = self._store.get(key)
        if buf is None or buf.numel() < need:
            self._store.pop(key, None)  # free the old buffer before allocating the bigger one
            buf = self._store[key] = torch.empty(need, dtype=src.dtype)
        return torch.index_select(src, 0, index, out=buf[:need].view(shape))


def full_rows_attn_mask(m: Tensor, full: FullGroup, plan: Plan, b: int, length: int) -> Tensor:
    """The rows of a 4-D ``attn_mask`` (B|1, H|1, L|1, L|1) read by the full group.

    Returns (B|1, H|1, m*b or 1, Lp or 1); padded keys read True / 0 (masked by ``key_valid``).
    """
    bm, hm, lq, lk = m.shape
    pad = plan.padded_len - length
    fill = True if m.dtype == torch.bool else 0.0
    if pad:
        m = F.pad(m, (0, pad if lk != 1 else 0, 0, pad if lq != 1 else 0), value=fill)
    if lq == 1:
        return m  # (B|1, H|1, 1, Lp|1) broadcasts over the query rows
    qb = full.query_blocks  # (H, m)
    if hm == 1 and not full.same_blocks:
        m = m.expand(bm, qb.shape[0], *m.shape[2:])  # heads read different rows
    hm = m.shape[1]
    rows = qb if hm != 1 else qb[:1]  # (H|1, m)
    hh = torch.arange(hm, device=m.device)[:, None]  # (H|1, 1)
    sel = m.view(bm, hm, plan.nb, b, m.shape[-1])[:, hh, rows]  # (B|1, H|1, m, b, Lp|1)
    return sel.reshape(bm, hm, rows.shape[1] * b, m.shape[-1])


def release_scratch(*modules: torch.nn.Module) -> None:
    """Free the inference scratch buffers of every sparse attention inside ``modules``.

    There is no global scratch: each module owns its buffers and frees them when it is deleted.
    This frees them earlier, e.g. ``release_scratch(model)`` after a long-sequence inference.
    """
    for root in modules:
        for mod in root.modules():
            scratch = getattr(mod, "_scratch", None)
            if isinstance(scratch, Scratch):
                scratch.clear()


class _GatherRows(torch.autograd.Function):
    """``src.index_select(0, index)`` whose backward is one ``index_add_`` (autograd's default
    backward of index_select takes a much slower scatter path on CPU)."""

    @staticmethod
    def forward(ctx: Any, src: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return out.index_add_(0, index, grad), None  # differentiable: double backward works


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of ``src`` (dim 0), with a fast backward."""
    return _GatherRows.apply(src, index)


def gather_attn_mask(m: Tensor, g: Group, plan: Plan, b: int) -> Tensor:
    """The entries of a 4-D ``attn_mask`` (B|1, H|1, Lq|1, Lk|1) that one group reads.

    Returns (n, B|1, w|1, c*b), same dtype (w = ``plan.q_width``); padded tokens read True / 0
    (the structural mask already keeps padded keys out, and padded queries are discarded).
    """
    bm, hm, lq, lk = m.shape
    n, c = g.kv_rows.shape
    w = plan.q_width
    fill = True if m.dtype == torch.bool else 0.0
    q_back = plan.q_blocks * w - plan.q_front - lq if lq != 1 else 0
    q_front = plan.q_front if lq != 1 else 0
    k_pad = plan.padded_len - lk if lk != 1 else 0
    if q_front or q_back or k_pad:
        m = F.pad(m, (0, k_pad, q_front, q_back), value=fill)
    nq, bq = (plan.q_blocks, w) if lq != 1 else (1, 1)
    nk, bk = (plan.nb, b) if lk != 1 else (1, 1)
    m6 = m.reshape(bm, hm, nq, bq, nk, bk)
    zeros = torch.zeros_like(g.heads)
    hi = (g.heads if hm != 1 else zeros)[:, None]  # (n, 1)
    qi = (g.query_blocks if nq != 1 else zeros)[:, None]  # (n, 1)
    ki = g.key_blocks if nk != 1 else torch.zeros_like(g.key_blocks)  # (n, c)
    sel = m6[:, hi, qi, :, ki, :]  # (n, c, B|1, bq, bk): advanced indices first
    sel = sel.permute(0, 2, 3, 1, 4).expand(n, bm, bq, c, b)  # (n, B|1, bq, c, b)
    return sel.reshape(n, bm, bq, c * b)
