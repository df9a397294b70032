"""Self-test of the context-parallel checks: each deliberately broken variant is caught by the
check named for its bug, and a correct variant with the same manifest passes that check.

The correct one (``GatherAll``) is the simplest honest distributed form: every rank fetches the
whole key/value sequence (``fetch_ranges``, differentiable) and attends its query shard to it at
the queries' global positions. O(L) memory per rank, but exact: what the suite must accept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conformance_toys import ALL, Textbook, assert_caught, registered_toys
from torch import Tensor

from attnreg.conformance import CheckFailure, run_check
from attnreg.core import Masks, UnsupportedFeatureError, VariantSpec, check_inputs
from attnreg.core.parallel import SequenceLayout, ShardContext, all_gather_ints, fetch_ranges

CP = dataclasses.replace(ALL, context_parallel=True)


class GatherAll(Textbook):
    """Declares context_parallel and fetches every key to every rank: correct, not scalable."""

    variant = "selftest_gather_all"
    capabilities = CP

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: ShardContext) -> Tensor:
        lay = ctx.k_layout
        b = key.shape[0]
        xs = [self._sent(key), self._sent(value)]
        if masks.key_mask is not None:
            xs.append(masks.key_mask.view(b, 1, -1, 1))  # (B, 1, L_local, 1): the layout's dim 2
        full = fetch_ranges(xs, lay, lambda r: [(0, lay.length)], ctx.group)  # (B, H, L, .) each
        k_all, v_all = self._fetched(full[0][0], full[1][0], key, value, ctx)  # (B, Hkv, L, E|Ev)
        km = full[2][0][:, 0, :, 0] if masks.key_mask is not None else None  # (B, L)
        pos = ctx.q_layout.positions(ctx.rank, query.device)  # (Lq_local,) global query positions
        allowed = None if km is None else km[:, None, None, :]  # (B, 1, 1, L)
        if masks.is_causal:
            causal = torch.arange(lay.length, device=query.device)[None, :] <= pos[:, None] + masks.q_offset
            allowed = causal[None, None] if allowed is None else allowed & causal[None, None]
        logits = self._logits(query, k_all, masks)  # (B, H, Lq_local, L)
        w = self._softmax(logits, allowed)
        return (w @ self._repeat(v_all, query.shape[1]).to(w.dtype)).to(query.dtype)

    def _sent(self, t: Tensor) -> Tensor:
        return t

    def _fetched(self, k_all: Tensor, v_all: Tensor, key: Tensor, value: Tensor, ctx: ShardContext
                 ) -> tuple[Tensor, Tensor]:
        return k_all, v_all


class OwnShardOnly(GatherAll):
    """Declares context_parallel, but each rank attends to its own key shard only."""

    variant = "selftest_own_shard_only"

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: ShardContext) -> Tensor:
        m = check_inputs(self.variant, self.capabilities, query, key, value, None, masks.key_mask,
                         masks.is_causal)
        return self._attend(query, key, value, m)


class DetachedHalo(GatherAll):
    """Right outputs, but the keys and values fetched from other ranks are detached: only the
    rank's own positions get gradients."""

    variant = "selftest_detached_halo"

    def _sent(self, t: Tensor) -> Tensor:
        return t.detach()

    def _fetched(self, k_all: Tensor, v_all: Tensor, key: Tensor, value: Tensor, ctx: ShardContext
                 ) -> tuple[Tensor, Tensor]:
        pos = ctx.k_layout.positions(ctx.rank, key.device)  # (Lk_local,)
        return k_all.index_copy(2, pos, key), v_all.index_copy(2, pos, value)  # own rows only


class NoContextParallel(Textbook):
    """Honestly declares context_parallel=False (the base class refuses forward_sharded)."""

    variant = "selftest_no_context_parallel"


class SilentSharded(NoContextParallel):
    """Declares context_parallel=False, but overrides forward_sharded to attend on the shard
    as if it were the whole sequence."""

    variant = "selftest_silent_sharded"

    def forward_sharded(self, query: Tensor, key: Tensor, value: Tensor, **kw: Any) -> Tensor:
        kw.pop("group", None)
        return self.forward(query, key, value, **kw)


class Unagreed(GatherAll):
    """Checks that the shards follow the layout (one all-gather of their lengths) but not that
    the ranks make the same call: with is_causal on one rank only, each computes something else."""

    variant = "selftest_unagreed"

    def forward_sharded(self, query: Tensor, key: Tensor, value: Tensor, *, group: Any = None,
                        attn_mask: Tensor | None = None, key_mask: Tensor | None = None,
                        is_causal: bool = False, **kw: Any) -> Tensor:
        if attn_mask is not None:
            raise UnsupportedFeatureError(self.variant, "attn_mask under a process group")
        rank, world = group.rank(), group.size()
        lengths = [row[0] for row in all_gather_ints([query.shape[2]], group)]
        lay = SequenceLayout(sum(lengths), world)
        if any(n != lay.shard_length(r) for r, n in enumerate(lengths)):
            raise ValueError("the shards do not follow the layout")
        masks = Masks(query.shape[0], query.shape[1], query.shape[2], key.shape[2], key_mask=key_mask,
                      is_causal=is_causal)
        return self._attend_sharded(query, key, value, masks, ShardContext(group, rank, world, lay, lay))


# broken class -> (the check that must catch it, a correct variant with the same capabilities)
BROKEN = {
    OwnShardOnly: ("context_parallel_matches", GatherAll),
    DetachedHalo: ("context_parallel_matches", GatherAll),
    Unagreed: ("context_parallel_errors", GatherAll),
    SilentSharded: ("context_parallel_refused", NoContextParallel),
}


@pytest.fixture(scope="module")
def registered() -> Iterator[dict[str, VariantSpec]]:
    with registered_toys(GatherAll, NoContextParallel, *BROKEN) as specs:
        yield specs


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.variant)
def test_broken_variant_is_caught_by_its_check(registered: dict[str, VariantSpec],
                                               cls: type[Textbook]) -> None:
    check, control = BROKEN[cls]
    assert_caught(cls, check, control, "B=", "declared", "rank")


def test_detached_halo_is_caught_by_the_key_gradient(registered: dict[str, VariantSpec]) -> None:
    with pytest.raises(CheckFailure, match=r"gradient w.r.t. key .* max \|error\| = "):
        run_check(DetachedHalo.variant, "context_parallel_matches")


def test_unagreed_variant_is_caught_by_the_disagreement(registered: dict[str, VariantSpec]) -> None:
    with pytest.raises(CheckFailure, match=r"is_causal=True on rank 0 only: rank 0 expected ValueError, "
                                           r"but the call succeeded"):
        run_check(Unagreed.variant, "context_parallel_errors")
