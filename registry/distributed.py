"""attnreg.distributed: run attention over a sequence split across a ``torch.distributed`` group.

The same module and config as on one machine; each process holds a shard of the sequence::

    import torch.distributed as dist
    import attnreg, attnreg.distributed as ad

    dist.init_process_group("gloo")                  # or "nccl"; launched by torchrun
    attn = attnreg.build("dot_product")              # also "local", "linear", "performer"
    q, k, v = (ad.shard(t) for t in (q_full, k_full, v_full))   # (B, H, L/P, E) on this rank
    out = attn.forward_sharded(q, k, v, is_causal=True, key_mask=ad.shard(pad_full))
    out.sum().backward()                             # gradients of this rank's shards
    full = ad.gather(out)                            # (B, H, L, Ev) on every rank, if needed

The layout (``attnreg.core.parallel.SequenceLayout``): 2P chunks, rank r holds chunk r then chunk
2P-1-r (equal causal work on every rank); chunk sizes differ by at most one when L is not a
multiple of 2P; L >= 2P. ``shard`` cuts a full tensor that every rank holds (same seed, or data
loaded on every rank); ``positions`` gives the global positions of a shard (position ids,
rotary tables). See docs/distributed.md for the communication of each variant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnreg.core.parallel import (
    CommStats,
    SequenceLayout,
    all_gather,
    all_gather_ints,
    comm_stats,
    group_rank_size,
    reset_comm_stats,
    resolve_group,
    shard_tensor,
    unshard_tensors,
)

from ._launch import launch_local, simulate

__all__ = [
    "CommStats", "SequenceLayout", "comm_stats", "forward", "gather", "launch_local", "layout",
    "positions", "reset_comm_stats", "shard", "simulate", "supports",
]


def layout(length: int, group: Any = None) -> SequenceLayout:
    """The split of a sequence of ``length`` positions over ``group`` (None = the default group)."""
    _, world = group_rank_size(resolve_group(group))
    return SequenceLayout(length, world)


def shard(x: Tensor, group: Any = None, *, dim: int | None = None) -> Tensor:
    """This rank's shard of the full tensor ``x`` (no communication: every rank holds ``x``).

    ``dim``: the sequence dim, by default 2 for ``(B, H, L, E)`` and 1 for a ``(B, L)`` key_mask.
    """
    rank, world = group_rank_size(resolve_group(group))
    d = (2 if x.dim() == 4 else 1 if x.dim() == 2 else None) if dim is None else dim
    if d is None:
        raise ValueError(f"shard: pass dim= for a {x.dim()}-D tensor (defaults: 2 for (B, H, L, E), "
                         "1 for (B, L))")
    return shard_tensor(x, SequenceLayout(x.shape[d], world), rank, d)


def positions(length: int, group: Any = None, device: torch.device | str | None = None) -> Tensor:
    """Global positions (int64) of this rank's shard of a ``length``-long sequence, in shard order."""
    rank, world = group_rank_size(resolve_group(group))
    return SequenceLayout(length, world).positions(rank, device)


def gather(x: Tensor, group: Any = None, *, dim: int | None = None) -> Tensor:
    """The full tensor on every rank from each rank's shard ``x`` (all-gather; not differentiable:
    the result is detached). ``dim`` as in ``shard``."""
    group = resolve_group(group)
    d = (2 if x.dim() == 4 else 1 if x.dim() == 2 else None) if dim is None else dim % x.dim()
    if d is None:
        raise ValueError(f"gather: pass dim= for a {x.dim()}-D tensor")
    lengths = [row[0] for row in all_gather_ints([x.shape[d]], group, x.device)]
    lay = SequenceLayout(sum(lengths), len(lengths))
    width = max(lengths)
    x = x.detach()
    if x.shape[d] < width:  # all_gather needs equal shapes: pad, gather, trim
        pad = list(x.shape)
        pad[d] = width - x.shape[d]
        x = torch.cat([x, x.new_zeros(pad)], dim=d)
    parts = all_gather(x, group, kind="gather")
    return unshard_tensors([p.narrow(d, 0, n) for p, n in zip(parts, lengths, strict=True)], lay, d)


def forward(module: Any, query: Tensor, key: Tensor, value: Tensor, group: Any = None,
            **kwargs: Any) -> Tensor:
    """``module.forward_sharded(query, key, value, group=group, **kwargs)``."""
    return module.forward_sharded(query, key, value, group=group, **kwargs)


def supports(variant: Any) -> bool:
    """Whether a variant (name, alias, ``VariantSpec`` or module) declares ``context_parallel``."""
    import attnreg

    if isinstance(variant, str):
        variant = attnreg.get_variant(variant)
    caps = getattr(variant, "capabilities", None)
    if caps is None:
        raise ValueError("supports: expected a variant name, VariantSpec or Attention module, "
                         f"got {variant!r}")
    return bool(caps.context_parallel)
