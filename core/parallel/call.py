"""``Attention.forward_sharded``: validation, agreement between ranks, and the shard context.

Every rank validates its own arguments, then ONE small all-gather shares (error?, lengths,
flags, sizes) so that all ranks either run or raise together: an error on one rank never
leaves the others waiting in a collective. The gathered lengths give the global lengths and
check that each rank holds the shard the layout gives it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..dtypes import FLOAT_DTYPES
from ..errors import UnsupportedFeatureError
from ..masks import CausalAlignment, Masks, causal_offset, check_inputs
from ..second_order import guard_second_order
from .comm import all_gather, all_gather_ints, group_rank_size, resolve_group
from .layout import SequenceLayout

if TYPE_CHECKING:
    from ..interface import Attention

__all__ = ["ShardContext", "run_sharded"]


@dataclass(frozen=True)
class ShardContext:
    """What a variant's distributed form needs to know about the call beyond its tensors."""

    group: Any  # the torch.distributed process group
    rank: int
    world: int
    q_layout: SequenceLayout  # how the queries' sequence is split
    k_layout: SequenceLayout  # how the keys' / values' sequence is split (same as q_layout if Lq == Lk)


# Fields every rank must agree on, after (error, Lq_local, Lk_local).
_FIELDS = ("has key_mask", "is_causal", "lower_right alignment", "dtype", "batch", "query heads",
           "key/value heads", "head dim", "value dim", "grad mode", "query requires grad",
           "key requires grad", "value requires grad")
_ERRORS = (ValueError, UnsupportedFeatureError, TypeError)
_SECOND_ORDER_HINT = ("forward_sharded is differentiable once (its backward communicates); "
                      "first-order gradients work, with or without create_graph")


def run_sharded(module: Attention, query: Tensor, key: Tensor, value: Tensor, group: Any,
                attn_mask: Tensor | None, key_mask: Tensor | None, is_causal: bool,
                causal_alignment: CausalAlignment) -> Tensor:
    """Validate, agree with the other ranks, and call ``module._attend_sharded``."""
    caps, variant = module.capabilities, module.variant
    if not caps.context_parallel:
        raise UnsupportedFeatureError(variant, "context parallelism (forward_sharded under a process group)")
    group = resolve_group(group)
    rank, world = group_rank_size(group)
    error: BaseException | None = None
    try:
        masks = _check_local(module, query, key, value, attn_mask, key_mask, is_causal, causal_alignment)
    except _ERRORS as err:
        error, masks = err, None
    device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    rows = all_gather_ints(_descriptor(error, query, key, value, key_mask, is_causal,
                                       causal_alignment), group, device)
    _raise_disagreement(variant, rows, error, group, device)
    assert masks is not None
    lq, lk = sum(r[1] for r in rows), sum(r[2] for r in rows)
    q_layout = _layout("query", lq, world, [r[1] for r in rows])
    k_layout = q_layout if lk == lq else _layout("key", lk, world, [r[2] for r in rows])
    offset = causal_offset(variant, caps, lq, lk, is_causal, causal_alignment)
    masks = dataclasses.replace(masks, q_offset=offset)  # local lengths, the global causal offset
    ctx = ShardContext(group, rank, world, q_layout, k_layout)
    # The distributed forms' backward passes communicate and are not differentiable again.
    query, key, value = guard_second_order(variant, query, key, value, hint=_SECOND_ORDER_HINT)
    key, value = _zero_padding(key, value, masks.key_mask)
    return module._attend_sharded(query, key, value, masks, ctx)


def _zero_padding(key: Tensor, value: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``key`` / ``value`` with non-finite entries at padded positions replaced by 0 (gradient 0
    there), so that padding changes nothing whatever it holds, as on one process; unchanged (no
    copy) when the padded entries are finite, the usual case. Real positions are left as they are."""
    if key_mask is None or key.device.type == "meta":
        return key, value
    bi, ji = (~key_mask).nonzero(as_tuple=True)  # (P,) padded (item, position) pairs
    if not bi.numel() or bool(torch.isfinite(key[bi, :, ji].sum() + value[bi, :, ji].sum())):
        return key, value
    pad = ~key_mask[:, None, :, None]  # (B, 1, Lk, 1)
    return (torch.where(pad & ~torch.isfinite(key), 0.0, key),
            torch.where(pad & ~torch.isfinite(value), 0.0, value))


def _check_local(module: Attention, query: Tensor, key: Tensor, value: Tensor,
                 attn_mask: Tensor | None, key_mask: Tensor | None, is_causal: bool,
                 causal_alignment: CausalAlignment) -> Masks:
    caps, variant = module.capabilities, module.variant
    if attn_mask is not None:
        raise UnsupportedFeatureError(variant, "attn_mask under a process group",
                                      "use key_mask / is_causal, which are split with the sequence")
    if module.active_dropout > 0:
        raise UnsupportedFeatureError(variant, "dropout under a process group", "call .eval()")
    if value is None:
        raise ValueError("value must be a torch.Tensor (B, Hkv, Lk_local, Ev), got None")
    # Shapes, dtypes, key_mask: on the local shards, whose lengths differ from the global ones
    # (the causal offset and the Lq != Lk rules are applied to the global lengths afterwards).
    local_caps = dataclasses.replace(caps, cross_attention=True)
    masks = check_inputs(variant, local_caps, query, key, value, None, key_mask, False)
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if causal_alignment not in ("upper_left", "lower_right"):
        raise ValueError(f"causal_alignment must be 'upper_left' or 'lower_right', got {causal_alignment!r}")
    if is_causal and not caps.causal:
        raise UnsupportedFeatureError(variant, "is_causal=True")
    return dataclasses.replace(masks, is_causal=is_causal)


def _descriptor(error: BaseException | None, query: Any, key: Any, value: Any, key_mask: Any,
                is_causal: Any, alignment: Any) -> list[int]:
    if error is not None or not all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value)):
        return [1 if error is not None else 2] + [-1] * (2 + len(_FIELDS))
    dt = FLOAT_DTYPES.index(query.dtype) if query.dtype in FLOAT_DTYPES else -1
    return [0, query.shape[2], key.shape[2], int(key_mask is not None), int(bool(is_causal)),
            int(alignment == "lower_right"), dt, query.shape[0], query.shape[1], key.shape[1],
            query.shape[3], value.shape[3], int(torch.is_grad_enabled()), int(query.requires_grad),
            int(key.requires_grad), int(value.requires_grad)]


def _raise_disagreement(variant: str, rows: list[list[int]], error: BaseException | None,
                        group: Any, device: torch.device) -> None:
    """Raise on every rank if any rank rejected its inputs or the ranks' calls differ."""
    failed = [r for r, row in enumerate(rows) if row[0] != 0]
    if failed:
        messages = _gather_messages(error, group, device)
        if error is not None:
            raise error
        first = failed[0]
        kind, text = messages[first]
        why = f"rank {first} of the process group rejected its inputs: {text}"
        if kind == "UnsupportedFeatureError":
            raise UnsupportedFeatureError(variant, text, f"refused on rank {first}")
        raise ValueError(why)
    for i, name in enumerate(_FIELDS, start=3):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"forward_sharded: every rank must make the same call, but '{name}' "
                             f"differs ({shown})")


def _gather_messages(error: BaseException | None, group: Any, device: torch.device
                     ) -> list[tuple[str, str]]:
    """Every rank's (error type, message) (empty where none), through two all-gathers."""
    if error is None:
        text, kind = "", ""
    elif isinstance(error, UnsupportedFeatureError):
        text, kind = error.feature, "UnsupportedFeatureError"
    else:
        text, kind = str(error), type(error).__name__
    raw = f"{kind}\n{text}".encode()[:4096]
    sizes = all_gather_ints([len(raw)], group, device)
    width = max(s[0] for s in sizes)
    buf = torch.zeros(width, dtype=torch.uint8, device=device)
    buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    out = []
    for s, row in zip(sizes, all_gather(buf, group, kind="control"), strict=True):
        k, _, t = bytes(row[:s[0]].tolist()).decode(errors="replace").partition("\n")
        out.append((k, t))
    return out


def _layout(what: str, length: int, world: int, held: list[int]) -> SequenceLayout:
    try:
        layout = SequenceLayout(length, world)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    bad = [(r, n, layout.shard_length(r)) for r, n in enumerate(held) if n != layout.shard_length(r)]
    if bad:
        shown = "; ".join(f"rank {r} holds {n}, the layout gives it {m}" for r, n, m in bad)
        raise ValueError(f"{what}: the shards do not follow the layout of {length} positions over {world} "
                         f"processes ({shown}); split inputs with attnreg.distributed.shard")
    return layout
