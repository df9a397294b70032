"""Execution plan of a block layout: query blocks grouped so that each group is one 4-D SDPA call.

For one (layout, length, causal) the plan lists, per group, the query-block rows ``h * nb + I``
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

__all__ = ["FullGroup", "Group", "Plan", "make_plan"]


@dataclass(frozen=True)
class Group:
    """Query-block rows with the same active key-block count (one SDPA call)."""

    rows: Tensor  # (n,) long: flattened row h * nb + I
    kv_rows: Tensor  # (n, c) long: flattened key block h * nb + J, special block last
    key_blocks: Tensor  # (n, c) long: J (head-free, for key_mask)
    heads: Tensor  # (n,) long: h
    query_blocks: Tensor  # (n,) long: I
    struct_mask: Tensor | None  # (block, c * block) bool, shared by the rows; None = no mask


@dataclass(frozen=True)
class FullGroup:
    """Query blocks that attend to every key block (BigBird's global rows), the same number per
    head: they need no gather at all -- one SDPA of their queries against the whole sequence."""

    rows: Tensor  # (H * m,) long: flattened rows h * nb + I, head-major
    query_blocks: Tensor  # (H, m) long: I
    key_valid: Tensor | None  # (Lp,) bool: False on the padding of a partial last block


@dataclass(frozen=True)
class Plan:
    """All groups of one layout and length (non-causal or its causal part)."""

    nb: int
    padded_len: int
    groups: tuple[Group, ...]
    full: FullGroup | None
    inverse: Tensor  # (H * nb,) long: where row r sits in [group outputs | full outputs | 0 block]
    active_pairs: int  # number of (h, I, J) blocks computed
    has_empty: bool  # some row attends to no block (its output is 0)


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
        full = FullGroup(rows.to(device), qblocks.to(device), valid)
        counts = counts.masked_fill(is_full, -1)  # handled by the full group
    flat_counts = counts.reshape(-1)
    flat_special = special.reshape(-1)
    groups: list[Group] = []
    pairs = zip(flat_counts.tolist(), flat_special.tolist(), strict=True)
    keys = sorted({(int(c), bool(s)) for c, s in pairs})
    for c, s in keys:
        if c <= 0:
            continue  # no key block (output stays 0), or a full row
        rows = ((flat_counts == c) & (flat_special == s)).nonzero().squeeze(1)  # (n,)
        h, q = rows // nb, rows % nb
        sel = layout[h, q]  # (n, nb) bool
        # Sort key: the special block gets nb (last); the others keep their order J.
        rank = torch.where(sel, idx[None, :].expand_as(sel), nb + 1)  # (n, nb)
        if s:
            rank = torch.where(idx[None, :] == special_col.reshape(-1)[rows][:, None], nb, rank)
        key_blocks = rank.argsort(dim=-1)[:, :c]  # (n, c) active J, special last
        groups.append(
            Group(
                rows=rows.to(device),
                kv_rows=(h[:, None] * nb + key_blocks).to(device),
                key_blocks=key_blocks.to(device),
                heads=h.to(device),
                query_blocks=q.to(device),
                struct_mask=_struct_mask(c, block, tail, causal).to(device) if s else None,
            )
        )
    # Outputs are concatenated as [group rows..., full rows..., one zero block]: invert that order.
    order = [g.rows.cpu() for g in groups] + ([full.rows.cpu()] if full is not None else [])
    inverse = torch.full((heads * nb,), sum(int(o.numel()) for o in order), dtype=torch.long)
    if order:
        cat = torch.cat(order)
        inverse[cat] = torch.arange(cat.numel())
    has_empty = bool((counts == 0).any())
    return Plan(nb, nb * block, tuple(groups), full, inverse.to(device), int(layout.sum()), has_empty)


def _struct_mask(c: int, block: int, tail: int, causal: bool) -> Tensor:
    """(block, c * block) bool: every slot open except the last (special) block's constraint."""
    mask = torch.ones(block, c * block, dtype=torch.bool)
    last = mask[:, (c - 1) * block :]  # (block, block) view of the special block
    if causal:
        last.copy_(torch.ones(block, block, dtype=torch.bool).tril())  # token j <= token i
    else:
        last[:, tail:] = False  # padded keys of the partial last block
    return mask
