"""``local`` over a sequence split across a process group: a halo exchange.

Query i needs keys ``[i - w, i + w]`` only (``[i - w, i]`` when causal). Each rank's shard is two
runs of positions (the zigzag layout, ``attnreg.core.parallel.SequenceLayout``); before them and
(non-causal) after them it fetches the ``w`` keys, values and key-mask entries it lacks from
whoever holds them (``fetch_ranges``): with ``w`` at most a chunk long (L / 2P) that is the
neighbouring ranks only, ``w * (E + Ev)`` values per run and direction, independent of L.
Backward returns the halo's gradients to their owners the same way.

Each run then goes through the module's own single-process path: causal, as the last queries of
``halo + run`` (lower-right alignment, the decoding path); non-causal, as the middle rows of
``halo + run + halo`` (the halo rows' outputs, at most 2w per run, are computed and dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnreg.core import Masks, UnsupportedFeatureError, check_inputs
from attnreg.core.parallel import ShardContext, fetch_ranges

if TYPE_CHECKING:
    from .attention import LocalAttention

__all__ = ["local_sharded"]


def local_sharded(module: LocalAttention, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                  ctx: ShardContext) -> Tensor:
    """This rank's output shard (B, H, L_local, Ev) of ``module`` over the whole sequence."""
    if ctx.q_layout != ctx.k_layout or masks.q_offset != 0:
        raise UnsupportedFeatureError(module.variant, "Lq != Lk under a process group",
                                      "self-attention only (the same sequence split the same way)")
    layout, w, causal = ctx.q_layout, module.window, masks.is_causal
    b, _, _, _ = query.shape
    pieces = layout.pieces(ctx.rank)
    km = masks.key_mask
    halves = 1 if causal else 2  # runs fetched per piece: before (and after)

    def wanted(rank: int) -> list[tuple[int, int]]:
        runs = []
        for p in layout.pieces(rank):
            runs.append((max(0, p.start - w), p.start))
            if not causal:
                runs.append((p.stop, min(layout.length, p.stop + w)))
        return runs

    tensors = [key, value] + ([km.view(b, 1, km.shape[1], 1)] if km is not None else [])
    if w > 0:
        halo = fetch_ranges(tensors, layout, wanted, ctx.group)  # per tensor, per run
    else:  # every query sees only itself: nothing to fetch
        halo = [[t.narrow(2, 0, 0)] * (halves * 2) for t in tensors]
    outs = []
    for i, p in enumerate(pieces):
        parts = []
        for t, runs in zip(tensors, halo, strict=True):
            own = t.narrow(2, p.local, p.length)
            before = runs[i * halves]
            after = [] if causal else [runs[i * halves + 1]]
            parts.append(torch.cat([before, own, *after], dim=2))
        k_ext, v_ext = parts[0], parts[1]  # (B, H, a + n (+ c), E|Ev)
        km_ext = parts[2][:, 0, :, 0] if km is not None else None  # (B, a + n (+ c))
        a = halo[0][i * halves].shape[2]
        q = query.narrow(2, p.local, p.length)  # (B, H, n, E)
        if causal:  # the run's queries are the last n positions of halo + run
            m = check_inputs(module.variant, module.capabilities, q, k_ext, v_ext, None, km_ext, True,
                             "lower_right")
            outs.append(module._attend(q, k_ext, v_ext, m))
        else:
            c = k_ext.shape[2] - a - p.length
            q_ext = torch.cat([q.new_zeros(*q.shape[:2], a, q.shape[3]), q,
                               q.new_zeros(*q.shape[:2], c, q.shape[3])], dim=2)  # (B, H, a + n + c, E)
            m = check_inputs(module.variant, module.capabilities, q_ext, k_ext, v_ext, None, km_ext, False)
            outs.append(module._attend(q_ext, k_ext, v_ext, m).narrow(2, a, p.length))
    return torch.cat(outs, dim=2)  # (B, H, L_local, Ev)
