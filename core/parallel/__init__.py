"""attnreg.core.parallel: the context-parallel part of the contract (sequences split over the
processes of a ``torch.distributed`` group).

- ``layout``: how a sequence is split (``SequenceLayout``: 2P chunks, rank r holds chunk r and
  its mirror 2P-1-r), ``shard_tensor`` / ``unshard_tensors``.
- ``comm``: point-to-point exchange and collectives on any process group, bytes counted per
  thread (``comm_stats``).
- ``autograd``: differentiable collectives (``all_reduce_sum``, ``exclusive_scan``,
  ``chunk_prefix``, ``fetch_ranges``) and the log-sum-exp merge (``lse_merge``).
- ``call``: ``ShardContext`` and the validation behind ``Attention.forward_sharded``.

Imports ``torch.distributed`` only when a group is used.
"""

from .autograd import all_reduce_sum, chunk_prefix, exclusive_scan, fetch_ranges, lse_merge
from .call import ShardContext, run_sharded
from .comm import (
    CommStats,
    Pending,
    all_gather,
    all_gather_ints,
    all_reduce_,
    comm_stats,
    exchange,
    group_rank_size,
    reset_comm_stats,
    resolve_group,
    start_exchange,
)
from .layout import Piece, SequenceLayout, shard_tensor, unshard_tensors

__all__ = [
    "CommStats",
    "Pending",
    "Piece",
    "SequenceLayout",
    "ShardContext",
    "all_gather",
    "all_gather_ints",
    "all_reduce_",
    "all_reduce_sum",
    "chunk_prefix",
    "comm_stats",
    "exchange",
    "exclusive_scan",
    "fetch_ranges",
    "group_rank_size",
    "lse_merge",
    "reset_comm_stats",
    "resolve_group",
    "run_sharded",
    "shard_tensor",
    "start_exchange",
    "unshard_tensors",
]
