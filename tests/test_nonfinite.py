"""NaN and inf at positions a query cannot see (core/nonfinite.py and the built-ins using it).

The conformance checks ``padding_invariance``, ``causal_no_future_leak``, ``nonfinite_locality``
and ``decode_padding_nonfinite`` hold every registered variant to this; here: the helpers against
brute force, unconditional screening (the torch.compile / CUDA-graph policy) run on CPU through the
same checks, and the shapes the conformance sizes do not reach (local's blocked path with wide
sequences, grouped-query heads, half precision).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnreg
import attnreg.core.nonfinite as nonfinite
from attnreg.conformance import run_check
from attnreg.core import (
    Capabilities,
    KVCacheState,
    check_inputs,
    hits_under,
    poison_rows,
    screen,
    screen_kv,
    span_hits,
)

NAN, INF = float("nan"), float("inf")
MINE = ("dot_product", "additive", "local", "sparse", "bigbird")
CAPS = Capabilities(causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
                    decoding=True, grouped_query=True)


def _brute_hits(bad: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq): rows whose allowed keys (B|1, H|1, Lq, Lk) hold a bad position (B, H, Lk)."""
    return (allowed & bad[:, :, None, :]).any(-1)


def test_span_hits_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    bad = torch.rand(2, 3, 17, generator=g) < 0.15  # (B, H, Lk)
    lo = torch.randint(-5, 17, (11,), generator=g)
    hi = torch.randint(-3, 22, (11,), generator=g)
    cols = torch.arange(17)
    allowed = (cols >= lo[:, None]) & (cols <= hi[:, None])  # (Lq, Lk); empty where hi < lo
    assert torch.equal(span_hits(bad, lo, hi), _brute_hits(bad, allowed[None, None]))


_SHAPES = [(7, 7, "upper_left", False), (7, 7, "upper_left", True), (9, 5, "upper_left", False),
           (9, 5, "upper_left", True), (5, 9, "lower_right", True)]  # (Lq, Lk, alignment, causal)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("lq,lk,align,causal", _SHAPES)
@pytest.mark.parametrize("mask", ["none", "key_mask", "bool", "float", "all"])
def test_hits_under_matches_brute_force(window: int | None, lq: int, lk: int, align: str, causal: bool,
                                        mask: str) -> None:
    g = torch.Generator().manual_seed(lq * 31 + lk)
    b, h, hkv = 2, 4, 2
    q, k = torch.randn(b, h, lq, 3), torch.randn(b, hkv, lk, 3)  # grouped-query: 2 query heads per key head
    km = torch.rand(b, lk, generator=g) < 0.8 if mask in ("key_mask", "all") else None
    am = None
    if mask in ("bool", "all"):
        am = torch.rand(b, h, lq, lk, generator=g) < 0.6
    elif mask == "float":
        hidden = torch.rand(1, h, lq, lk, generator=g) < 0.4
        am = torch.randn(1, h, lq, lk, generator=g).masked_fill(hidden, -INF)
    masks = check_inputs("t", CAPS, q, k, None, am, km, causal, align)
    bad = torch.rand(b, hkv, lk, generator=g) < 0.2  # (B, Hkv, Lk)
    allowed = masks.allowed()
    allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool) if allowed is None else allowed
    if window is not None:
        pos = torch.arange(lq)[:, None] + masks.q_offset
        allowed = allowed & ((pos - torch.arange(lk)[None, :]).abs() <= window)
    got = hits_under(bad, masks, window)
    want = _brute_hits(bad.repeat_interleave(h // hkv, dim=1), allowed.expand(b, h, lq, lk))
    if got.shape[1] == hkv:  # per key head: every query head of the group sees the same keys
        got = got.repeat_interleave(h // hkv, dim=1)
    assert torch.equal(got, want)


def test_screen_kv_policies() -> None:
    k, v = torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 4)
    k2, v2, bad = screen_kv(k, v)
    assert k2 is k and v2 is v and bad is None  # CPU, all finite: untouched, no copy
    k[0, 1, 2, 0], v[1, 0, 4, 3], v[1, 1, 0, 0] = NAN, INF, -INF
    k2, v2, bad = screen_kv(k, v)
    assert torch.isfinite(k2).all() and torch.isfinite(v2).all()
    want = torch.zeros(2, 2, 5, dtype=torch.bool)
    want[0, 1, 2] = want[1, 0, 4] = want[1, 1, 0] = True
    assert torch.equal(bad, want)
    assert k2[0, 1, 2, 0] == 0 and torch.equal(k2[0, 1, 2, 1:], k[0, 1, 2, 1:])  # only the bad entry
    km = torch.empty(2, 2, 5, 3, device="meta")
    assert screen_kv(km, km)[2] is None
    half = torch.full((1, 1, 4, 2), 6e4, dtype=torch.float16)  # its sum overflows float16, not float32
    assert screen_kv(half, half)[2] is None
    k2, v2 = torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2)
    k2[0, 0, 1] = NAN
    assert screen_kv(k2, v2, start=2)[2] is None  # only positions >= start are checked
    assert torch.equal(screen_kv(k2, v2, start=1)[2], torch.tensor([[[False, True] + [False] * 4]]))


def test_screen_reads_only_hidden_positions() -> None:
    """``screen`` checks (and reacts to) what some query cannot see: padding, the lower-right
    causal future; a NaN every query sees is left for the kernel to propagate."""
    k, v = torch.randn(2, 1, 6, 2), torch.randn(2, 1, 6, 2)
    q = torch.randn(2, 1, 2, 2)
    km = torch.ones(2, 6, dtype=torch.bool)
    km[1, 0] = False
    k[0, 0, 2] = NAN  # real, seen by both queries (positions 4 and 5)
    masks = check_inputs("t", CAPS, q, k, None, None, km, True, "lower_right")
    assert screen(k, v, masks)[2] is None
    v[0, 0, 5] = INF  # the future of query 0
    assert screen(k, v, masks)[2] is not None
    v[0, 0, 5] = 0.0
    k[1, 0, 0] = NAN  # padding
    assert screen(k, v, masks)[2] is not None
    assert screen(k, v, dataclasses.replace(masks, padding_zeroed=True))[2] is None  # trusted: zeroed
    nothing_hidden = dataclasses.replace(masks, key_mask=None, is_causal=False)
    assert screen(k, v, nothing_hidden)[2] is None


def test_poison_rows_gradient() -> None:
    """A hit row is NaN; its gradient is NaN where the loss uses it and 0 where it does not (so a
    row the loss ignores does not spread NaN to the inputs it saw)."""
    x = torch.randn(1, 2, 3, 4, requires_grad=True)
    hit = torch.tensor([[[False, True, False], [False, False, False]]])  # (B, H, Lq)
    out = poison_rows(x * 2, hit)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, [0, 2]]).all()
    (out[0, 0, 0].sum() + out[0, 1].sum()).backward()  # the loss leaves row 1 of head 0 out
    assert torch.isfinite(x.grad).all() and (x.grad[0, 0, 1] == 0).all()
    x.grad = None
    poison_rows(x * 2, hit).sum().backward()
    assert torch.isnan(x.grad[0, 0, 1]).all() and torch.equal(x.grad[0, 0, 0], torch.full((4,), 2.0))


@pytest.fixture
def always_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled / CUDA-graph policy on CPU: screen every call, no data-dependent check."""
    monkeypatch.setattr(nonfinite, "_branchless", lambda t: True)


_SCREENED_CHECKS = ("mask_combined", "fully_masked_rows", "gradcheck",
                    "decode_matches_forward", "padding_invariance", "causal_no_future_leak",
                    "nonfinite_locality", "decode_padding_nonfinite")


@pytest.mark.parametrize("check", _SCREENED_CHECKS)
@pytest.mark.parametrize("variant", MINE)
def test_unconditional_screening_passes_conformance(always_screen: None, variant: str, check: str) -> None:
    """Screening every call (under torch.compile or CUDA graph capture) gives the same results:
    the conformance checks pass under the spec's first check_config (blocked / chunked paths at
    the suite's sizes)."""
    spec = attnreg.get_variant(variant)
    run_check(spec, check, overrides=spec.check_configs[0] if spec.check_configs else None)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masks", ["none", "key_mask", "attn_mask"])
def test_local_blocked_nan_stays_in_its_window(causal: bool, masks: str) -> None:
    """local's blocked path (several interior blocks, two edges, padded pairs): a NaN key or an
    inf value at a real position changes exactly the rows whose window holds it."""
    torch.manual_seed(0)
    w, blk, n = 5, 8, 90
    m = attnreg.build("local", window=w, block_size=blk)
    q, k, v = torch.randn(3, 2, 3, n, 4).double().unbind(0)
    kw: dict = {"is_causal": causal}
    if masks == "key_mask":
        kw["key_mask"] = torch.rand(2, n) < 0.8
    elif masks == "attn_mask":
        kw["attn_mask"] = torch.rand(2, 1, n, n) < 0.8
    clean = m(q, k, v, **kw)
    allowed = m.attention_weights(q, k, **kw) != 0  # (B, H, L, L): window and masks
    for pos, which in ((37, "key"), (45, "value"), (3, "key"), (86, "value")):  # interior and both edges
        k2, v2 = k.clone(), v.clone()
        (k2 if which == "key" else v2)[:, :, pos] = NAN if which == "key" else INF
        got = m(q, k2, v2, **kw)
        hit = allowed[..., pos]  # (B, H, L)
        assert torch.equal(got[~hit], clean[~hit]), f"{which} {pos}: rows outside its window changed"
        assert not torch.isfinite(got[hit]).all(-1).any(), f"{which} {pos}: a row that sees it is finite"


def test_grouped_query_and_half_precision() -> None:
    """dot_product with grouped-query heads (and a per-head mask), and in float16 / bfloat16."""
    torch.manual_seed(1)
    m = attnreg.build("dot_product")
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[0, :3] = km[1, -2:] = False
    pad = ~km[:, None, :, None]
    am = torch.rand(2, 4, 11, 11) < 0.7
    for kw in ({"key_mask": km}, {"key_mask": km, "is_causal": True}, {"key_mask": km, "attn_mask": am}):
        want = m(q, k, v, **kw)
        got = m(q, k.masked_fill(pad, NAN), v.masked_fill(pad, INF), **kw)
        torch.testing.assert_close(got, want)
    kf, vf = k.clone(), v.clone()
    kf[:, :, 7:], vf[:, :, 7:] = NAN, INF  # the future of queries 0..6, SDPA's own causal kernel
    got, want = m(q, kf, vf, is_causal=True), m(q, k, v, is_causal=True)
    assert torch.equal(got[:, :, :7], want[:, :, :7]) and torch.isnan(got[:, :, 7:]).all()
    for dt in (torch.float16, torch.bfloat16):
        qh, kh, vh = (t.to(dt) for t in (q, k, v))
        want = m(qh, kh, vh, key_mask=km, is_causal=True)
        got = m(qh, kh.masked_fill(pad, NAN), vh.masked_fill(pad, -INF), key_mask=km, is_causal=True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("variant", MINE)
def test_decoding_states_store_zeros_at_padding(variant: str) -> None:
    """What decode keeps of a padded position is 0, whatever the input held there."""
    kw = {"num_heads": 2, "head_dim": 4} if variant == "additive" else {}
    if variant in ("sparse", "bigbird", "local"):
        kw["block_size"] = 4
    m = attnreg.build(variant, **kw)
    q, k, v = torch.randn(3, 2, 2, 6, 4).unbind(0)
    km = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    state = m.init_state(2, 2, 4, max_length=16)
    pad = ~km[:, None, :, None]  # (B, 1, T, 1)
    _, state = m.decode(q, k.masked_fill(pad, NAN), v.masked_fill(pad, INF), state, key_mask=km)
    held = state.key if not isinstance(state, KVCacheState) else state.key_buffer[:, :, :6]
    assert torch.isfinite(held).all() and (held[0, :, :2] == 0).all()
