"""Process-group primitives of context parallelism, with the bytes each process sends counted.

They call a ``torch.distributed`` process group's own methods (``send``, ``recv``, ``allreduce``,
``allgather``) with ranks *within the group*, so any group works: the default world, one made by
``torch.distributed.new_group``, or a backend object not registered with the default world (the
conformance suite runs its ranks as threads of one process, each with its own gloo group).

Point-to-point messages are posted in rank-parity order (even ranks send first, odd ranks
receive first) so that blocking backends pair them up on a two-process ring too. Every message
and collective adds to the calling thread's ``comm_stats()``: p2p counts the bytes handed to
``send``; a collective counts its input tensor once (what the backend puts on the wire depends
on its algorithm: a ring all-reduce sends about 2 (P-1)/P times that).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CommStats", "Pending", "all_gather", "all_gather_ints", "all_reduce_", "comm_stats", "exchange",
    "group_rank_size", "reset_comm_stats", "resolve_group", "start_exchange",
]

_local = threading.local()


@dataclass
class CommStats:
    """What this thread has sent since the last reset: bytes and message count, also by kind."""

    bytes_sent: int = 0
    messages: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        """Count one message (or collective contribution) of ``nbytes``."""
        self.bytes_sent += nbytes
        self.messages += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes


def comm_stats() -> CommStats:
    """The calling thread's counters (autograd runs a CPU backward in the calling thread, so a
    forward and its backward count together)."""
    stats = getattr(_local, "stats", None)
    if stats is None:
        stats = _local.stats = CommStats()
    return stats


def reset_comm_stats() -> CommStats:
    """Start counting afresh; returns the counters so far."""
    old = comm_stats()
    _local.stats = CommStats()
    return old


_METHODS = ("rank", "size", "send", "recv", "allreduce", "allgather")


def resolve_group(group: Any = None) -> Any:
    """``group`` checked to be a process group, or the default one when None.

    Raises ``ValueError`` when None is given and ``torch.distributed`` is not initialized.
    """
    if group is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: no process group was given and torch.distributed is not "
                             "initialized; call torch.distributed.init_process_group() (torchrun) "
                             "or pass group=")
        return dist.group.WORLD
    missing = [m for m in _METHODS if not callable(getattr(group, m, None))]
    if missing:
        raise ValueError(f"group must be a torch.distributed process group, got {type(group).__name__} "
                         f"(no {', '.join(missing)})")
    return group


def group_rank_size(group: Any) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size)."""
    return int(group.rank()), int(group.size())


class Pending:
    """Messages in flight; ``wait()`` blocks until all are done (receive buffers then hold data)."""

    def __init__(self, works: list[Any]) -> None:
        self._works = works

    def wait(self) -> None:
        """Block until every posted send and receive has completed."""
        works, self._works = self._works, []
        for w in works:
            w.wait()


def start_exchange(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]],
                   group: Any, kind: str = "p2p", tag: int = 0) -> Pending:
    """Post ``sends`` ((peer, tensor)) and ``recvs`` ((peer, buffer)) without waiting.

    The i-th message to a peer pairs with that peer's i-th receive from this rank, within one
    call (tags ``tag + i`` count per peer; exchanges in flight at the same time between the same
    ranks need ``tag`` bases far enough apart). Empty tensors are skipped on both sides (both
    know the sizes). Sending to oneself is an error: callers copy locally.
    """
    rank, _ = group_rank_size(group)
    stats = comm_stats()
    posted: list[tuple[str, int, Tensor, int]] = []
    tags: dict[tuple[str, int], int] = {}
    for what, items in (("send", sends), ("recv", recvs)):
        for peer, t in items:
            if peer == rank:
                raise ValueError(f"start_exchange: rank {rank} cannot {what} to itself")
            i = tags.get((what, peer), 0)
            tags[(what, peer)] = i + 1
            if t.numel() == 0:
                continue
            if what == "recv" and not t.is_contiguous():
                raise ValueError("start_exchange: receive buffers must be contiguous")
            posted.append((what, peer, t.contiguous() if what == "send" else t, tag + i))
    # Even ranks send first, odd ranks receive first: on a backend whose sends wait for the
    # matching receive (NCCL, one stream per peer pair), neighbours never both wait on a send.
    posted.sort(key=lambda m: (m[0] == "send") == bool(rank % 2))
    works = []
    for what, peer, t, t_tag in posted:
        if what == "send":
            stats.add(kind, t.numel() * t.element_size())
            works.append(group.send([t], peer, t_tag))
        else:
            works.append(group.recv([t], peer, t_tag))
    return Pending(works)


def exchange(sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]], group: Any,
             kind: str = "p2p", tag: int = 0) -> None:
    """``start_exchange(...).wait()``: the receive buffers hold the data on return."""
    start_exchange(sends, recvs, group, kind, tag).wait()


def all_reduce_(t: Tensor, group: Any, op: str = "sum", kind: str = "all_reduce") -> Tensor:
    """Reduce ``t`` in place over the group (``op``: sum, max or min) and return it."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {tuple(ops)}, got {op!r}")
    if not t.is_contiguous():
        raise ValueError("all_reduce_: the tensor must be contiguous (it is reduced in place)")
    if group.size() == 1:
        return t  # nothing to combine, nothing sent
    opts = dist.AllreduceOptions()
    opts.reduceOp = ops[op]
    comm_stats().add(kind, t.numel() * t.element_size())
    group.allreduce([t], opts).wait()
    return t


def all_gather(t: Tensor, group: Any, kind: str = "all_gather") -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), in rank order."""
    _, world = group_rank_size(group)
    t = t.contiguous()
    if world == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world)]
    comm_stats().add(kind, t.numel() * t.element_size())
    group.allgather([out], [t]).wait()
    return out


def all_gather_ints(values: Sequence[int], group: Any, device: torch.device | str = "cpu") -> list[list[int]]:
    """Every rank's list of ``len(values)`` integers, in rank order (one small all-gather)."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    return [row.tolist() for row in all_gather(t, group, kind="control")]
