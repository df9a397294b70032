"""The context-parallel contract in one process: the sequence layout, the collectives and their
gradients, the ring's block schedule, the ``attnreg.distributed`` front and ``forward_sharded``'s
validation. Ranks are threads with gloo groups (``attnreg.distributed.simulate``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import attnreg
import attnreg.distributed as ad
from attnreg.core import UnsupportedFeatureError
from attnreg.core.parallel import (
    SequenceLayout,
    all_reduce_sum,
    chunk_prefix,
    comm_stats,
    exchange,
    exclusive_scan,
    fetch_ranges,
    lse_merge,
    reset_comm_stats,
    shard_tensor,
    unshard_tensors,
)
from attnreg.plugins.dot_product.distributed import ring_blocks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
F64 = torch.float64


# -- layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("length", "world"), [(2, 1), (13, 2), (16, 4), (29, 4), (9, 3), (8, 4)])
def test_layout_chunks_pieces_and_round_trip(length: int, world: int) -> None:
    lay = SequenceLayout(length, world)
    sizes = [b - a for a, b in lay.chunks]
    assert len(sizes) == 2 * world and sum(sizes) == length and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the longer chunks come first
    owned = torch.cat([lay.positions(r) for r in range(world)])
    assert sorted(owned.tolist()) == list(range(length))
    for r in range(world):
        front, back = lay.pieces(r)
        assert (front.start, back.stop) == (lay.chunks[r][0], lay.chunks[2 * world - 1 - r][1])
        assert lay.shard_length(r) == front.length + back.length
    x = torch.arange(3 * length).view(1, 1, length, 3)  # (1, 1, L, 3)
    shards = [shard_tensor(x, lay, r) for r in range(world)]
    for r, s in enumerate(shards):
        assert torch.equal(s[0, 0, :, 0] // 3, lay.positions(r))
    assert torch.equal(unshard_tensors(shards, lay), x)
    km = torch.arange(length)[None].expand(2, length)  # (B, L): dim 1 by default
    assert torch.equal(unshard_tensors([shard_tensor(km, lay, r) for r in range(world)], lay), km)


def test_layout_locate_matches_positions() -> None:
    lay = SequenceLayout(29, 4)
    for a in range(0, 29, 3):
        for b in range(a, 30, 5):
            runs = lay.locate(a, b)
            assert sum(p.length for p in runs) == b - a
            for p in runs:
                assert torch.equal(lay.positions(p.rank)[p.local:p.local + p.length],
                                   torch.arange(p.start, p.stop))


def test_layout_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"length >= 8"):
        SequenceLayout(7, 4)
    with pytest.raises(ValueError, match="world"):
        SequenceLayout(8, 0)
    lay = SequenceLayout(8, 2)
    with pytest.raises(ValueError, match="rank"):
        lay.pieces(2)
    with pytest.raises(ValueError, match="positions along dim 2"):
        shard_tensor(torch.zeros(1, 1, 9, 2), lay, 0)
    with pytest.raises(ValueError, match="pass dim="):
        shard_tensor(torch.zeros(8, 2, 2), lay, 0)
    with pytest.raises(ValueError, match="expected 2 shards"):
        unshard_tensors([torch.zeros(1, 1, 4, 1)], lay)


# -- collectives --------------------------------------------------------------------------------
def test_lse_merge_is_the_softmax_of_the_union_and_never_nan() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, dtype=F64, generator=g)
    v = torch.randn(7, 4, dtype=F64, generator=g)
    a, b = slice(0, 3), slice(3, 7)
    out_a, out_b = torch.softmax(s[:, a], -1) @ v[a], torch.softmax(s[:, b], -1) @ v[b]
    out, lse = lse_merge(out_a, torch.logsumexp(s[:, a], -1), out_b, torch.logsumexp(s[:, b], -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-14)
    ninf = torch.full((3,), float("-inf"), dtype=F64)
    out, lse = lse_merge(torch.zeros(3, 4, dtype=F64), ninf, torch.zeros(3, 4, dtype=F64), ninf)
    assert torch.equal(out, torch.zeros(3, 4, dtype=F64)) and torch.equal(lse, ninf)


def _per_rank(world: int, seed: int, *shape: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=F64, generator=g) for _ in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_exclusive_scan_and_all_reduce_values_and_gradients(world: int) -> None:
    xs, ws = _per_rank(world, 1, 2, 3), _per_rank(world, 2, 3, 2, 3)

    def fn(rank: int, group: Any) -> list[torch.Tensor]:
        x = xs[rank].clone().requires_grad_(True)
        fwd, rev = exclusive_scan(x, group), exclusive_scan(x, group, reverse=True)
        tot = all_reduce_sum(x, group)
        ((fwd * ws[rank][0]).sum() + (rev * ws[rank][1]).sum() + (tot * ws[rank][2]).sum()).backward()
        return [fwd.detach(), rev.detach(), tot.detach(), x.grad]

    res = ad.simulate(world, fn, timeout=30)
    zero = torch.zeros(2, 3, dtype=F64)
    for r in range(world):
        fwd, rev, tot, grad = res[r]
        torch.testing.assert_close(fwd, sum(xs[:r], zero), rtol=0, atol=1e-14)
        torch.testing.assert_close(rev, sum(xs[r + 1:], zero), rtol=0, atol=1e-14)
        torch.testing.assert_close(tot, sum(xs, zero), rtol=0, atol=1e-14)
        want = sum((ws[o][0] for o in range(r + 1, world)), zero) + sum((ws[o][1] for o in range(r)), zero)
        want = want + sum(ws[o][2] for o in range(world))
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_prefix_sums_the_chunks_before_in_sequence_order(world: int) -> None:
    fronts, backs = _per_rank(world, 3, 2, 2), _per_rank(world, 4, 2, 2)
    wf, wb = _per_rank(world, 5, 2, 2), _per_rank(world, 6, 2, 2)
    order = [fronts[c] if c < world else backs[2 * world - 1 - c] for c in range(2 * world)]  # chunk c

    def fn(rank: int, group: Any) -> list[torch.Tensor]:
        f, b = fronts[rank].clone().requires_grad_(True), backs[rank].clone().requires_grad_(True)
        pf, pb = chunk_prefix(f, b, group)
        ((pf * wf[rank]).sum() + (pb * wb[rank]).sum()).backward()
        return [pf.detach(), pb.detach(), f.grad, b.grad]

    res = ad.simulate(world, fn, timeout=30)
    zero = torch.zeros(2, 2, dtype=F64)
    # the weight on chunk c's prefix, and so d(loss)/d(chunk c) = sum of weights of later chunks
    weight = [wf[c] if c < world else wb[2 * world - 1 - c] for c in range(2 * world)]
    for r in range(world):
        cf, cb = r, 2 * world - 1 - r
        torch.testing.assert_close(res[r][0], sum(order[:cf], zero), rtol=0, atol=1e-14)
        torch.testing.assert_close(res[r][1], sum(order[:cb], zero), rtol=0, atol=1e-14)
        torch.testing.assert_close(res[r][2], sum(weight[cf + 1:], zero), rtol=0, atol=1e-14)
        torch.testing.assert_close(res[r][3], sum(weight[cb + 1:], zero), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("length", "world", "width"), [(13, 2, 2), (29, 4, 9), (16, 3, 40)])
def test_fetch_ranges_values_and_gradients(length: int, world: int, width: int) -> None:
    """Runs before and after each piece (a halo of ``width``, wider than a chunk in the last
    case: several owners) arrive with the right values; their gradients reach the owners."""
    lay = SequenceLayout(length, world)
    g = torch.Generator().manual_seed(length)
    full = torch.randn(2, 3, length, 4, dtype=F64, generator=g)  # (B, H, L, E)
    mask = torch.rand(2, length, generator=g) < 0.5  # (B, L) travels along, no gradient
    weights = [torch.randn(2, 3, 2 * width, 4, dtype=F64, generator=g) for _ in range(4)]

    def wanted(rank: int) -> list[tuple[int, int]]:
        return [run for p in lay.pieces(rank) for run in
                ((max(0, p.start - width), p.start), (p.stop, min(length, p.stop + width)))]

    def fn(rank: int, group: Any) -> list[Any]:
        x = shard_tensor(full, lay, rank).requires_grad_(True)
        km = shard_tensor(mask, lay, rank).view(2, 1, -1, 1)
        got, got_mask = fetch_ranges([x, km], lay, wanted, group)
        loss = sum((t * weights[i][:, :, :t.shape[2]]).sum() for i, t in enumerate(got))
        loss.backward()  # type: ignore[union-attr]
        return [[t.detach() for t in got], got_mask, x.grad]

    res = ad.simulate(world, fn, timeout=30)
    xg = full.clone().requires_grad_(True)
    loss = 0
    for r in range(world):
        for i, (a, b) in enumerate(wanted(r)):
            assert torch.equal(res[r][0][i], full[:, :, a:b])
            assert torch.equal(res[r][1][i][:, 0, :, 0], mask[:, a:b])
            loss = loss + (xg[:, :, a:b] * weights[i][:, :, :b - a]).sum()
    loss.backward()  # type: ignore[union-attr]
    torch.testing.assert_close(unshard_tensors([r[2] for r in res], lay), xg.grad, rtol=0, atol=1e-13)


def test_comm_stats_count_bytes_per_thread() -> None:
    def fn(rank: int, group: Any) -> tuple[int, int]:
        reset_comm_stats()
        buf = torch.empty(10, dtype=F64)
        exchange([(1 - rank, torch.ones(10 + rank, dtype=F64)[:10])], [(1 - rank, buf)], group)
        return comm_stats().bytes_sent, comm_stats().messages

    assert ad.simulate(2, fn) == [(80, 1), (80, 1)]
    with pytest.raises(ValueError, match="to itself"):
        ad.simulate(1, lambda r, g: exchange([(0, torch.ones(1))], [], g))


# -- the ring's schedule -------------------------------------------------------------------------
@pytest.mark.parametrize(("length", "world"), [(16, 4), (24, 3), (8, 2), (29, 4)])
def test_ring_skips_future_blocks_and_balances_causal_work(length: int, world: int) -> None:
    lay = SequenceLayout(length, world)
    pos = [lay.positions(r) for r in range(world)]
    work, allowed_seen = [], 0
    for r in range(world):
        n = 0
        for src in range(world):
            for qp, kp, masked in ring_blocks(lay, lay, r, src, True, 0):
                qi, kj = torch.arange(qp.start, qp.stop)[:, None], torch.arange(kp.start, kp.stop)[None]
                allowed = kj <= qi
                assert bool(allowed.any()), "a block entirely in the future is computed"
                assert masked == (not bool(allowed.all())), "a mask is applied iff some key is in the future"
                allowed_seen += int(allowed.sum())
                n += qp.length * kp.length
        work.append(n)
        # non-causal: every piece pair, once
        assert len([b for s in range(world) for b in ring_blocks(lay, lay, r, s, False, 0)]) == 4 * world
    assert allowed_seen == length * (length + 1) // 2  # no skipped block held an allowed pair
    assert sum(len(p) for p in pos) == length
    if length % (2 * world) == 0:  # equal chunks: every rank computes the same number of scores
        assert len(set(work)) == 1, work
    else:
        assert max(work) - min(work) <= 4 * length, work  # chunk sizes differ by one position


# -- the attnreg.distributed front and forward_sharded's validation ---------------------------------
def test_shard_gather_positions_round_trip() -> None:
    x = torch.randn(2, 3, 11, 4, dtype=F64)

    def fn(rank: int, group: Any) -> list[Any]:
        s = ad.shard(x, group)
        return [s, ad.gather(s * 2, group), ad.positions(11, group), ad.layout(11, group).world]

    res = ad.simulate(3, fn)
    for s, full, pos, world in res:
        assert torch.equal(s, x[:, :, pos]) and torch.equal(full, 2 * x) and world == 3
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        ad.shard(x)
    with pytest.raises(ValueError, match="process group"):
        ad.shard(x, group="world")


def _outcomes(world: int, fn: Any) -> list[BaseException | None]:
    def wrapped(rank: int, group: Any) -> BaseException | None:
        try:
            fn(rank, group)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            return err
        return None

    return ad.simulate(world, wrapped, timeout=30)


def test_an_error_on_one_rank_is_raised_on_every_rank() -> None:
    """Rank 1's key_mask is not bool: rank 1 raises its ValueError, rank 0 one that names rank 1,
    and no rank is left waiting for the other."""
    m = attnreg.build("dot_product")
    q = torch.randn(2, 2, 12, 8, dtype=F64)
    km = torch.ones(2, 12, dtype=torch.bool)

    def fn(rank: int, group: Any) -> None:
        mask = ad.shard(km, group)
        m.forward_sharded(*(ad.shard(q, group) for _ in range(3)), group=group,
                          key_mask=mask if rank == 0 else mask.float())

    e0, e1 = _outcomes(2, fn)
    assert isinstance(e1, ValueError) and "key_mask must be a bool tensor" in str(e1)
    assert isinstance(e0, ValueError) and "rank 1 of the process group rejected its inputs" in str(e0)


@pytest.mark.parametrize(("name", "call", "error", "text"), [
    ("additive", {"cfg": {"num_heads": 2, "head_dim": 8}}, UnsupportedFeatureError, "context parallelism"),
    ("dot_product", {"attn_mask": True}, UnsupportedFeatureError, "attn_mask under a process group"),
    ("dot_product", {"train_dropout": True}, UnsupportedFeatureError, "dropout under a process group"),
    ("local", {"lq": 8}, UnsupportedFeatureError, "cross attention"),
    ("local", {"lq": 8, "is_causal": True, "causal_alignment": "lower_right"}, UnsupportedFeatureError,
     "Lq != Lk under a process group"),
    ("linear", {"lq": 8, "is_causal": True}, UnsupportedFeatureError, "causal attention with Lq != Lk"),
    ("dot_product", {"rank0_causal": True}, ValueError, "'is_causal' differs (rank 0: 1, rank 1: 0)"),
    ("dot_product", {"length": 3}, ValueError, "cannot be split over 2 processes"),
    ("dot_product", {"is_causal": True, "causal_alignment": "lower-right"}, ValueError,
     "causal_alignment must be 'upper_left' or 'lower_right'"),
    ("dot_product", {"causal_alignment": "lower_right"}, ValueError, "needs is_causal=True"),
])
def test_forward_sharded_refusals_are_the_same_on_every_rank(name: str, call: dict[str, Any],
                                                               error: type[Exception], text: str) -> None:
    call = dict(call)
    n, lq = call.pop("length", 12), call.pop("lq", None)
    cfg = call.pop("cfg", {}) | ({"dropout": 0.1} if call.pop("train_dropout", False) else {})
    m = attnreg.build(name, **cfg).double()
    m.train(m.dropout_p > 0)
    q = torch.randn(2, 2, lq or n, 8, dtype=F64)
    k, v = torch.randn(2, 2, n, 8, dtype=F64), torch.randn(2, 2, n, 8, dtype=F64)
    rank0_causal = call.pop("rank0_causal", False)
    if call.pop("attn_mask", False):
        call["attn_mask"] = torch.ones(n, n, dtype=torch.bool)

    def fn(rank: int, group: Any) -> None:
        kw = dict(call, is_causal=rank == 0) if rank0_causal else call
        if n < 4:
            parts = (q[:, :, :2],) * 3 if rank == 0 else (q[:, :, 2:],) * 3  # 3 positions, 2 ranks
            return m.forward_sharded(*parts, group=group, **kw)
        shards = (ad.shard(q, group), ad.shard(k, group), ad.shard(v, group))
        return m.forward_sharded(*shards, group=group, **kw)

    for rank, err in enumerate(_outcomes(2, fn)):
        assert isinstance(err, error), (rank, err)
        assert text in str(err), (rank, str(err))


def test_forward_sharded_on_one_process_is_forward() -> None:
    """P = 1: the shard is the whole sequence (chunk 0 then chunk 1) and nothing is sent."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=F64, generator=g) for _ in range(3))
    for name in ("dot_product", "local", "linear", "performer"):
        m = attnreg.build(name)

        def fn(rank: int, group: Any, m: Any = m) -> tuple[torch.Tensor, int]:
            reset_comm_stats()
            return m.forward_sharded(q, k, v, group=group, is_causal=True), comm_stats().bytes_sent

        (out, sent), = ad.simulate(1, fn)
        torch.testing.assert_close(out, m(q, k, v, is_causal=True), rtol=0, atol=1e-12)
        assert sent == 0, name


def test_supports_reads_the_capability() -> None:
    assert [ad.supports(n) for n in ("dot_product", "sdpa", "local", "linear", "performer")] == [True] * 5
    assert not ad.supports("additive") and not ad.supports(attnreg.get_variant("sparse"))
    assert ad.supports(attnreg.build("local"))
    with pytest.raises(ValueError, match="expected a variant name"):
        ad.supports(3)
