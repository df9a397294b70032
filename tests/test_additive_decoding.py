"""additive: lower-right causal alignment through the chunked path (forward, weights, gradients of
q, k, v and every parameter against the float64 reference), the causal FLOP count with an offset,
and KV-cache decoding equal to the causal full forward."""

from __future__ import annotations

import pytest
import torch

from attnreg.core import UnsupportedFeatureError, causal_mask, check_inputs
from attnreg.plugins.additive import AdditiveAttention, AdditiveConfig
from attnreg.plugins.additive.attention import causal_pairs
from attnreg.plugins.additive.reference import additive_reference

TOL = 1e-10
B, H, E, EV = 3, 2, 6, 5
F64 = torch.float64


def _module(chunk: int | None, seed: int = 0) -> AdditiveAttention:
    torch.manual_seed(seed)
    return AdditiveAttention(AdditiveConfig(num_heads=H, head_dim=E, hidden_dim=7, chunk_size=chunk)).double()


def _qkv(lq: int, lk: int, seed: int = 1, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, E, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lq, E)
    k = torch.randn(B, H, lk, E, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lk, E)
    v = torch.randn(B, H, lk, EV, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lk, Ev)
    return q, k, v


def _mask_kwargs(kind: str, lq: int, lk: int) -> dict:
    g = torch.Generator().manual_seed(lq * 100 + lk)
    km = torch.ones(B, lk, dtype=torch.bool)
    km[0, : lk // 2] = False  # left padding
    km[1, lk - 1] = False  # the newest key of item 1 is padding: its last rows see less
    kw: dict = {}
    if kind in ("key_mask", "all"):
        kw["key_mask"] = km
    if kind in ("bool", "all"):
        kw["attn_mask"] = torch.rand(B, 1, lq, lk, generator=g) > 0.3
    if kind == "float":
        bias = torch.randn(1, H, lq, lk, generator=g, dtype=F64)
        kw["attn_mask"] = bias.masked_fill(torch.rand(lq, lk, generator=g) < 0.2, float("-inf"))
    return kw


@pytest.mark.parametrize("kind", ["none", "key_mask", "bool", "float", "all"])
@pytest.mark.parametrize("lq,lk,chunk", [(1, 9, 1), (1, 9, 4), (5, 12, 2), (7, 7, 3), (13, 40, 3),
                                         (13, 40, 64), (7, 5, 2), (12, 5, 2), (12, 5, 5), (12, 5, 64)])
def test_lower_right_matches_reference(lq: int, lk: int, chunk: int, kind: str) -> None:
    m = _module(chunk)
    q, k, v = _qkv(lq, lk)
    kw = _mask_kwargs(kind, lq, lk)
    out = m(q, k, v, is_causal=True, causal_alignment="lower_right", **kw)  # (B, H, Lq, Ev)
    masks = check_inputs("additive", m.capabilities, q, k, v, kw.get("attn_mask"), kw.get("key_mask"),
                         True, "lower_right")
    assert masks.q_offset == lk - lq
    ref, ref_w = additive_reference(q, k, v, masks, m.w_q, m.w_k, m.b, m.v, m.scale)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    w = m.attention_weights(q, k, is_causal=True, causal_alignment="lower_right", **kw)
    torch.testing.assert_close(w, ref_w, atol=TOL, rtol=0)
    # Lower-right differs from upper-left here: the last query sees the newest keys.
    assert bool((ref_w[..., -1, lq:] > 0).any()) or lk <= lq
    # Lq > Lk: the first Lq - Lk queries come before every key: output 0, as dot_product gives.
    assert torch.count_nonzero(out[:, :, : max(lq - lk, 0)]) == 0
    wrt = [q, k, v, *m.parameters()]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = torch.autograd.grad(out, wrt, upstream)
    want = torch.autograd.grad(ref, wrt, upstream)
    for name, a, b in zip(["q", "k", "v", "w_q", "w_k", "b", "v_h"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda s, n=name: f"grad {n}: {s}")
        assert b.abs().max() > 0, f"reference grad {name} is all zero: the check has no teeth"


def test_chunks_read_only_the_keys_they_can_see(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each causal chunk's pairwise workspace stops at its last row's key position (+ q_offset)."""
    from attnreg.plugins.additive import chunked

    seen: list[int] = []
    tanh_into = chunked._tanh_into

    def spy(ws, qp, kp):
        seen.append(kp.shape[2])
        return tanh_into(ws, qp, kp)

    monkeypatch.setattr(chunked, "_tanh_into", spy)
    m = _module(4)
    q, k, v = _qkv(10, 25, grad=False)
    m(q, k, v, is_causal=True, causal_alignment="lower_right")
    assert seen == [19, 23, 25]  # chunks end at rows 3, 7, 9 -> key positions 18, 22, 24


@pytest.mark.parametrize("lq,lk,offset", [(5, 5, 0), (7, 3, 0), (3, 7, 0), (3, 10, 7), (1, 9, 8),
                                          (6, 20, 14), (7, 5, -2), (12, 5, -7), (4, 2, -2), (3, 4, -3)])
def test_causal_pairs_count_the_mask_with_an_offset(lq: int, lk: int, offset: int) -> None:
    assert causal_pairs(lq, lk, offset) == int(causal_mask(lq, lk, offset=offset).sum())


@pytest.mark.parametrize("lq,lk", [(5, 5), (7, 3), (3, 7), (1, 9), (12, 5)])
@pytest.mark.parametrize("alignment", ["upper_left", "lower_right"])
def test_flops_counts_causal_pairs_of_the_alignment(lq: int, lk: int, alignment: str) -> None:
    m = _module(4)
    q, k, _ = _qkv(lq, lk, grad=False)
    masks = check_inputs("additive", m.capabilities, q, k, None, None, None, True, alignment)
    pairs = int(masks.allowed().sum())  # (1, 1, Lq, Lk): what forward attends to
    d_a = m.hidden_dim
    want = B * H * (2.0 * (lq + lk) * E * d_a + pairs * (4.0 * d_a + 2.0 * EV))
    assert m.flops(B, H, lq, lk, E, EV, is_causal=True, causal_alignment=alignment) == want


def _decode_all(m, q, k, v, cuts, key_mask=None, state=None):
    state = state or m.init_state(q.shape[0], H, E, EV, dtype=F64)
    outs = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        km = None if key_mask is None else key_mask[:, a:b]
        o, state = m.decode(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, key_mask=km)
        outs.append(o)
    return torch.cat(outs, dim=2), state  # (B, H, L, Ev)


L = 29
CUTS = [0, 11, *range(12, 17), L]  # a prefill, 5 single tokens, one multi-token chunk


def _left_padding() -> torch.Tensor:
    km = torch.ones(B, L, dtype=torch.bool)
    km[0, :4] = False
    km[2, :14] = False  # longer than the prefix
    return km


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_decode_equals_causal_full_forward(chunk: int | None, pad: bool) -> None:
    m = _module(chunk)
    q, k, v = _qkv(L, L, seed=3, grad=False)
    km = _left_padding() if pad else None
    full = m(q, k, v, is_causal=True, key_mask=km)  # (B, H, L, Ev)
    out, state = _decode_all(m, q, k, v, CUTS, km)
    assert state.length == L
    torch.testing.assert_close(out, full, atol=TOL, rtol=0)
    if pad:
        assert torch.count_nonzero(out[2, :, :14]) == 0


def test_decode_parameter_gradients_equal_the_full_forward() -> None:
    m = _module(3)
    q, k, v = _qkv(L, L, seed=4)
    km = _left_padding()
    upstream = torch.randn(B, H, L, EV, generator=torch.Generator().manual_seed(5), dtype=F64)
    wrt = [q, k, v, *m.parameters()]
    out, _ = _decode_all(m, q, k, v, CUTS, km)
    got = torch.autograd.grad(out, wrt, upstream)
    want = torch.autograd.grad(m(q, k, v, is_causal=True, key_mask=km), wrt, upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_index_select_equals_decoding_the_reordered_batch() -> None:
    m = _module(2)
    q, k, v = _qkv(L, L, seed=6, grad=False)
    km = _left_padding()
    _, state = _decode_all(m, q, k, v, [0, 9, 10], km)
    idx = torch.tensor([1, 2, 2, 0])
    rq, rk, rv, rkm = q[idx], k[idx], v[idx], km[idx]
    got, _ = _decode_all(m, rq, rk, rv, [10, 11, 20, L], rkm, state.index_select(idx))
    want, _ = _decode_all(m, rq, rk, rv, [0, 10, 11, 20, L], rkm, m.init_state(4, H, E, EV, dtype=F64))
    torch.testing.assert_close(got, want[:, :, 10:], atol=TOL, rtol=0)


def test_init_state_checks_the_parameter_sizes() -> None:
    m = _module(2)
    with pytest.raises(ValueError, match="num_heads=2"):
        m.init_state(B, H + 1, E)
    with pytest.raises(ValueError, match="head_dim=6"):
        m.init_state(B, H, E + 1)
    with pytest.raises(UnsupportedFeatureError):
        m.init_state(B, H, E, dtype=torch.int64)
