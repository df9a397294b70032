"""Execution plan of a block layout: query blocks grouped so that each group is one 4-D SDPA call.

For one (layout, length, causal) the plan lists, per group, the query-block rows ``h * nq + I``
and the key blocks each of them attends to. Rows in a group have the same number of active
key blocks ``c``, so the gathered keys are a dense ``(B, n_rows, c * block, E)`` tensor and SDPA
runs on 4-D inputs. Within a row the key blocks are ordered so that the one block that may need a
token-level mask (the diagonal block under causal, the partial last block otherwise) comes
last; the group then shares one ``(block, c * block)`` mask -- and groups without such a block
need no mask at all, which keeps SDPA on its fast kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FullGroup", "Group", "Plan", "RowTable", "make_plan", "offset_plan", "row_table"]


@dataclass(frozen=True)
class Group:
    """Query-block rows with the same active key-block count (one SDPA call)."""

    rows: Tensor  # (n,) long: flattened query row h * q_blocks + (I - first query block)
    kv_rows: Tensor  # (n, c) long: flattened key block h * nb + J, special block last
    key_blocks: Tensor  # (n, c) long: J (head-free, for key_mask)
    heads: Tensor  # (n,) long: h
    query_blocks: Tensor  # (n,) long: I - first query block (the block's index among the queries)
    struct_mask: Tensor | None  # (q_width, c * block) bool, shared by the rows; None = no mask

    @classmethod
    def on(cls, device: torch.device | str, rows: Tensor, kv_rows: Tensor, key_blocks: Tensor, heads: Tensor,
           query_blocks: Tensor, struct_mask: Tensor | None) -> Group:
        """A group built on the CPU (plans are), moved to ``device``."""
        return cls(rows.to(device), kv_rows.to(device), key_blocks.to(device), heads.to(device),
                   query_blocks.to(device), None if struct_mask is None else struct_mask.to(device))


@dataclass(frozen=True)
class FullGroup:
    """Query blocks that attend to every key block (BigBird's global rows), the same number per
    head: they need no gather at all -- one SDPA of their queries against the whole sequence."""

    rows: Tensor  # (H * m,) long: flattened rows h * nb + I, head-major
    query_blocks: Tensor  # (H, m) long: I
    key_valid: Tensor | None  # (Lp,) bool: False on the padding of a partial last block
    same_blocks: bool = True  # every head's rows are the same query blocks


@dataclass(frozen=True)
class Plan:
    """All groups of one layout and length (non-causal or its causal part).

    The keys are ``nb`` blocks per (batch, head), ``padded_len = nb * block`` tokens. The queries
    are ``q_blocks`` blocks of ``q_width`` rows each, the first ``q_front`` rows padding: the
    same blocks as the keys for a full call; the query blocks of the last positions for a
    lower-right call (``offset_plan``), ``q_width`` < block when they all fit in one block.
    """

    nb: int
    padded_len: int
    groups: tuple[Group, ...]
    full: FullGroup | None
    inverse: Tensor  # (H * q_blocks,) long: where row r sits in [group outputs | full outputs | 0 block]
    active_pairs: int  # number of (h, I, J) blocks computed
    has_empty: bool  # some row attends to no block (its output is 0)
    q_blocks: int
    q_width: int
    q_front: int


def make_plan(layout: Tensor, block: int, length: int, causal: bool, device: torch.device) -> Plan:
    """Group the rows of ``layout (H, nb, nb)`` for ``length`` tokens (``causal``: its causal part)."""
    heads, nb, _ = layout.shape
    tail = length - (nb - 1) * block  # size of the last block, 1..block
    idx = torch.arange(nb)
    if causal:
        layout = layout & (idx[None, :] <= idx[:, None])  # (H, nb, nb) causal part of the layout
        special = layout[:, idx, idx]  # (H, nb): the diagonal block needs the triangular mask
        special_col = idx[None, :].expand(heads, nb)  # (H, nb) its column J = I
    else:
        partial = tail < block
        special = layout[:, :, nb - 1] & partial  # (H, nb): rows reading the partial last block
        special_col = torch.full((heads, nb), nb - 1)
    counts = layout.sum(-1)  # (H, nb)
    full = None
    is_full = counts == nb  # (H, nb)
    per_head = is_full.sum(-1)  # (H,)
    if not causal and bool((per_head == per_head[0]).all()) and int(per_head[0]) > 0:
        m = int(per_head[0])
        qblocks = is_full.nonzero()[:, 1].reshape(heads, m)  # (H, m), head-major like nonzero()
        rows = (torch.arange(heads)[:, None] * nb + qblocks).reshape(-1)  # (H*m,)
        key_valid = (torch.arange(nb * block) < length) if tail < block else None  # (Lp,)
        valid = None if key_valid is None else key_valid.to(device)
        full_rows = rows
        full = FullGroup(rows.to(device), qblocks.to(device), valid, bool((qblocks == qblocks[:1]).all()))
        counts = counts.masked_fill(is_full, -1)  # handled by the full group
    flat_counts = counts.reshape(-1)
    flat_special = special.reshape(-1)
    groups: list[Group] = []
    order: list[Tensor] = []  # each group's rows, on the CPU (a meta device holds no values)
    pairs = zip(flat_counts.tolist(), flat_special.tolist(), strict=True)
    keys = sorted({(int(c), bool(s)) for c, s in pairs})
    for c, s in keys:
        if c <= 0:
            continue  # no key block (output stays 0), or a full row
        rows = ((flat_counts == c) & (flat_special == s)).nonzero().squeeze(1)  # (n,)
        order.append(rows)
        h, q = rows // nb, rows % nb
        sel = layout[h, q]  # (n, nb) bool
        # Sort key: the special block gets nb (last); the others keep their order J.
        rank = torch.where(sel, idx[None, :].expand_as(sel), nb + 1)  # (n, nb)
        if s:
            rank = torch.where(idx[None, :] == special_col.reshape(-1)[rows][:, None], nb, rank)
        key_blocks = rank.argsort(dim=-1)[:, :c]  # (n, c) active J, special last
        groups.append(Group.on(device, rows, h[:, None] * nb + key_blocks, key_blocks, h, q,
                               _struct_mask(c, block, tail, causal) if s else None))
    # Outputs are concatenated as [group rows..., full rows..., one zero block]: invert that order.
    if full is not None:
        order.append(full_rows)
    inverse = torch.full((heads * nb,), sum(int(o.numel()) for o in order), dtype=torch.long)
    if order:
        cat = torch.cat(order)
        inverse[cat] = torch.arange(cat.numel())
    has_empty = bool((counts == 0).any())
    return Plan(nb, nb * block, tuple(groups), full, inverse.to(device), int(layout.sum()), has_empty,
                q_blocks=nb, q_width=block, q_front=0)


def _struct_mask(c: int, block: int, tail: int, causal: bool) -> Tensor:
    """(block, c * block) bool: every slot open except the last (special) block's constraint."""
    mask = torch.ones(block, c * block, dtype=torch.bool)
    last = mask[:, (c - 1) * block :]  # (block, block) view of the special block
    if causal:
        last.copy_(torch.ones(block, block, dtype=torch.bool).tril())  # token j <= token i
    else:
        last[:, tail:] = False  # padded keys of the partial last block
    return mask


@dataclass(frozen=True)
class RowTable:
    """The causal part of a layout, one row per (head, query block): what lower-right calls read.

    Built once per (length, heads); a call for the queries of blocks I0..I1 then reads
    O(H * (I1 - I0 + 1) * C) entries of it, whatever the context length.
    """

    key_blocks: Tensor  # (H, nb, C) long: active J <= I ascending, the diagonal block last; then filler
    counts: Tensor  # (H, nb) long: active key blocks of the row
    diagonal: Tensor  # (H, nb) bool: the row reads its own block (the one needing a triangular mask)


def row_table(layout: Tensor) -> RowTable:
    """The ``RowTable`` of ``layout (H, nb, nb)`` (CPU)."""
    heads, nb, _ = layout.shape
    idx = torch.arange(nb)
    causal = layout & (idx[None, :] <= idx[:, None])  # (H, nb, nb)
    counts = causal.sum(-1)  # (H, nb)
    width = max(1, int(counts.max()))
    eye = torch.eye(nb, dtype=torch.bool)
    key_blocks = torch.empty(heads, nb, width, dtype=torch.long)
    for h in range(heads):  # one head at a time: the ranks are nb x nb int64
        rank = torch.where(causal[h], idx[None, :], nb + 1)  # (nb, nb) inactive blocks sort last
        rank = rank.masked_fill(eye & causal[h], nb)  # the diagonal just before them
        key_blocks[h] = rank.argsort(dim=-1)[:, :width]
    return RowTable(key_blocks, counts, causal[:, idx, idx])


def offset_plan(
    table: RowTable, block: int, q_start: int, q_end: int, key_blocks: int, device: torch.device
) -> Plan:
    """Plan of the queries at positions ``q_start..q_end-1`` attending causally to the keys at
    ``0..q_end-1`` through ``table`` (the layout of the total length, which may exceed q_end).

    The keys are held in ``key_blocks >= ceil(q_end / block)`` blocks per (batch, head); a key
    past ``q_end`` only ever sits in a diagonal block, behind its triangular mask. Queries
    within one block are taken as they are (``q_width = q_end - q_start``: a decoded token costs
    one row, not a block); otherwise the first block is padded in front to whole blocks.
    """
    heads = table.counts.shape[0]
    first, last = q_start // block, (q_end - 1) // block
    nq = last - first + 1
    if nq == 1:
        width, front, shift = q_end - q_start, 0, q_start - first * block
    else:
        width, front, shift = block, q_start - first * block, 0
    counts = table.counts[:, first : last + 1]  # (H, nq)
    code = (counts * 2 + table.diagonal[:, first : last + 1]).reshape(-1)  # (H*nq,) one SDPA per code
    groups: list[Group] = []
    order: list[Tensor] = []  # each group's rows, on the CPU
    for value in torch.unique(code).tolist():
        c, special = value // 2, bool(value % 2)
        if c == 0:
            continue  # no key block: output 0
        rows = (code == value).nonzero().squeeze(1)  # (n,)
        order.append(rows)
        h, qi = rows // nq, rows % nq
        kb = table.key_blocks[h, qi + first, :c]  # (n, c), diagonal last
        groups.append(Group.on(device, rows, h[:, None] * key_blocks + kb, kb, h, qi,
                               _diagonal_mask(c, block, width, shift) if special else None))
    inverse = torch.full((heads * nq,), sum(int(o.numel()) for o in order), dtype=torch.long)
    if order:
        cat = torch.cat(order)
        inverse[cat] = torch.arange(cat.numel())
    return Plan(key_blocks, key_blocks * block, tuple(groups), None, inverse.to(device),
                int(counts.sum()), bool((counts == 0).any()), q_blocks=nq, q_width=width, q_front=front)


def _diagonal_mask(c: int, block: int, width: int, shift: int) -> Tensor:
    """(width, c * block) bool: query row t (token ``shift + t`` of its block) sees token s of the
    diagonal block (the last of the c) where s <= shift + t, every token of the others."""
    mask = torch.ones(width, c * block, dtype=torch.bool)
    mask[:, (c - 1) * block :] = torch.arange(block)[None, :] <= torch.arange(width)[:, None] + shift
    return mask
