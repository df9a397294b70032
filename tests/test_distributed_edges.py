"""Edges of context parallelism, ranks as threads (``attnreg.distributed.simulate``): the ring's
block math (fused CPU kernels against the explicit formula), padding that holds NaN / inf, and
second-order gradients (refused)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import attnreg
import attnreg.distributed as ad
from attnreg.core import UnsupportedFeatureError
from attnreg.core.parallel import unshard_tensors

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
F64 = torch.float64


# -- the ring's block math: the fused flash path against the explicit formula -------------------------
@pytest.mark.parametrize(("heads", "kv_heads", "e", "ev"), [(2, 2, 8, 8), (4, 2, 8, 6), (2, 1, 4, 7)])
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_flash_blocks_equal_the_explicit_formula(monkeypatch: pytest.MonkeyPatch, heads: int, kv_heads: int,
                                                 e: int, ev: int, diag: bool, padded: bool) -> None:
    """A block through torch's fused CPU flash kernels (E != Ev zero-padded, grouped key/value
    repeated for the kernel, key_mask as a bias, rows with no key -> lse -inf) equals the
    explicit formula: merged output, log-sum-exp and the three gradient contributions."""
    from attnreg.plugins.dot_product import blocks

    g = torch.Generator().manual_seed(heads * 100 + e * 10 + ev)
    n = 9
    # Row-narrowed views of longer tensors, as the ring passes its pieces (no copy per block).
    q = torch.randn(2, heads, n + 3, e, dtype=F64, generator=g)[:, :, 2:2 + n]
    k = torch.randn(2, kv_heads, n + 3, e, dtype=F64, generator=g)[:, :, 1:1 + n]
    v = torch.randn(2, kv_heads, n + 3, ev, dtype=F64, generator=g)[:, :, 1:1 + n]
    km = None
    if padded:
        km = torch.rand(2, n, generator=g) < 0.6
        km[0, :3] = False  # under the diagonal mask, rows 0-2 of item 0 see no key
        km[1] = False  # item 1: no key at all
    prior_out = torch.randn(2, heads, n, ev, dtype=F64, generator=g)  # an earlier block's result
    prior_lse = torch.randn(2, heads, n, dtype=F64, generator=g)
    do = torch.randn(2, heads, n + 3, ev, dtype=F64, generator=g)[:, :, 3:]
    diff = 0 if diag else None
    results = []
    for flash in (True, False):
        monkeypatch.setattr(blocks, "USE_FLASH", flash)
        out, lse = prior_out.clone(), prior_lse.clone()
        blocks.block_forward(q, k, v, km, diff, 0.3, out, lse)
        grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
        delta = (do * out).sum(-1)
        blocks.block_backward(q, k, v, km, diff, 0.3, do, out, lse, delta, *grads)
        results.append([out, lse, *grads])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


# -- padding that holds NaN / inf ---------------------------------------------------------------
@pytest.mark.parametrize(("name", "cfg"), [("dot_product", {}), ("local", {"window": 3, "block_size": 4}),
                                           ("linear", {"chunk_size": 4}), ("performer", {"chunk_size": 4})])
@pytest.mark.parametrize("causal", [False, True])
def test_poisoned_padding_changes_nothing(name: str, cfg: dict[str, Any], causal: bool) -> None:
    """NaN and inf at padded positions of key and value: the sharded outputs and gradients equal
    the single-process ones on clean padding (1e-10), and the padded entries get gradient 0."""
    g = torch.Generator().manual_seed(3)
    n = 15
    q, k, v = (torch.randn(2, 2, n, 6, dtype=F64, generator=g) for _ in range(3))
    up = torch.randn(2, 2, n, 6, dtype=F64, generator=g)
    km = torch.ones(2, n, dtype=torch.bool)
    km[0, [2, 9, 13, 14]] = False
    km[1, :4] = False
    m = attnreg.build(name, **cfg)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = m(*ref, is_causal=causal, key_mask=km)
    (want * up).sum().backward()
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, :, 2], bad_k[1, 1, 1] = float("nan"), float("inf")  # (B, H, L, E) at padded positions
    bad_v[0, 1, 13], bad_v[1, :, 3] = float("-inf"), float("nan")

    def fn(rank: int, group: Any) -> list[torch.Tensor]:
        mine = [ad.shard(t, group).requires_grad_() for t in (q, bad_k, bad_v)]
        out = m.forward_sharded(*mine, group=group, is_causal=causal, key_mask=ad.shard(km, group))
        (out * ad.shard(up, group)).sum().backward()
        return [out.detach(), *(t.grad for t in mine)]

    res = ad.simulate(2, fn)
    for i, name_ in enumerate(("output", "grad query", "grad key", "grad value")):
        got = unshard_tensors([r[i] for r in res], ad.SequenceLayout(n, 2))  # (B, H, L, E)
        expected = want.detach() if i == 0 else ref[i - 1].grad
        assert torch.isfinite(got).all(), name_  # padded entries of key / value: gradient 0
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=name_)


# -- second-order gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dot_product", "local", "linear"])
def test_second_order_gradients_are_refused_on_every_rank(name: str) -> None:
    """First-order gradients with create_graph=True work; differentiating one of them again
    raises UnsupportedFeatureError on every rank (the distributed backward is not differentiable
    again), instead of a silent zero or torch's once_differentiable error."""
    q = torch.randn(2, 2, 12, 8, dtype=F64)
    m = attnreg.build(name)

    def fn(rank: int, group: Any) -> BaseException | None:
        mine = [ad.shard(q, group).requires_grad_() for _ in range(3)]
        out = m.forward_sharded(*mine, group=group, is_causal=True)
        (gq,) = torch.autograd.grad(out.square().sum(), mine[0], create_graph=True)
        assert gq.shape == mine[0].shape and torch.isfinite(gq).all()
        try:
            gq.square().sum().backward()
        except UnsupportedFeatureError as err:
            return err
        return None

    for rank, err in enumerate(ad.simulate(2, fn)):
        assert isinstance(err, UnsupportedFeatureError), (rank, err)
        assert "forward_sharded is differentiable once" in str(err), str(err)


_RING_NAN = ("documented limitation (docs/distributed.md): the ring's diagonal blocks multiply "
             "the masked weight 0 by a future NaN value, so earlier rows of its chunk turn NaN too")


@pytest.mark.parametrize(("name", "cfg"), [
    ("local", {"window": 3, "block_size": 4}), ("linear", {"chunk_size": 4}),
    ("performer", {"chunk_size": 4}),
    pytest.param("dot_product", {}, marks=pytest.mark.xfail(strict=True, reason=_RING_NAN))])
def test_a_real_nan_reaches_the_rows_that_see_it(name: str, cfg: dict[str, Any]) -> None:
    """Causal, a NaN value at a real position: the sharded output is NaN on the same rows as the
    single-process one, and equal elsewhere."""
    g = torch.Generator().manual_seed(4)
    n = 16
    q, k, v = (torch.randn(2, 2, n, 6, dtype=F64, generator=g) for _ in range(3))
    v[0, 1, 9, 2] = float("nan")  # position 9: chunk 2 of 4 (rank 1's front chunk at P = 2)
    m = attnreg.build(name, **cfg)
    want = m(q, k, v, is_causal=True)

    def fn(rank: int, group: Any) -> torch.Tensor:
        return m.forward_sharded(*(ad.shard(t, group) for t in (q, k, v)), group=group, is_causal=True)

    got = unshard_tensors(ad.simulate(2, fn), ad.SequenceLayout(n, 2))  # (B, H, L, Ev)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10, equal_nan=True)
