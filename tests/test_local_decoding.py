"""local: lower-right causal alignment (queries = the last Lq of Lk positions) on the blocked fast
path and the dense one, against the float64 reference (forward, weights, gradients); and decoding
with the rolling-window state: equal to the causal full forward, O(window) memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnreg
from attnreg.core import KVCacheState, check_inputs
from attnreg.plugins.local import _blocked
from attnreg.plugins.local.decoding import LocalState
from attnreg.plugins.local.reference import local_reference

B, H, E, EV = 3, 2, 4, 5
TOL = 1e-10
F64 = torch.float64


def _qkv(lq: int, lk: int, seed: int = 0, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, E, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lq, E)
    k = torch.randn(B, H, lk, E, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lk, E)
    v = torch.randn(B, H, lk, EV, generator=g, dtype=F64).requires_grad_(grad)  # (B, H, Lk, Ev)
    return q, k, v


def _mask_kwargs(mode: str, lq: int, lk: int) -> dict:
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    km = torch.ones(B, lk, dtype=torch.bool)
    km[0, : lk // 2] = False  # left padding over half the keys
    km[1, lk // 3] = False  # one hole
    kw: dict = {}
    if mode in ("key_mask", "bool_mask", "float_mask"):
        kw["key_mask"] = km
    if mode == "bool_mask":
        kw["attn_mask"] = torch.rand(B, 1, lq, lk, generator=g) > 0.3
    if mode == "float_mask":
        bias = torch.randn(1, H, lq, lk, generator=g, dtype=F64)
        kw["attn_mask"] = bias.masked_fill(torch.rand(lq, lk, generator=g) < 0.2, float("-inf"))
    return kw


def _check_lower_right(window: int, block: int, lq: int, lk: int, mode: str) -> torch.Tensor:
    attn = attnreg.build("local", window=window, block_size=block)
    q, k, v = _qkv(lq, lk)
    kw = _mask_kwargs(mode, lq, lk)
    out = attn(q, k, v, is_causal=True, causal_alignment="lower_right", **kw)  # (B, H, Lq, Ev)
    masks = check_inputs("local", attn.capabilities, q, k, v, kw.get("attn_mask"), kw.get("key_mask"),
                         True, "lower_right")
    assert masks.q_offset == lk - lq
    ref, ref_w = local_reference(q, k, v, masks, window)
    assert out.shape == (B, H, lq, EV)
    assert (out - ref).abs().max().item() <= TOL
    w = attn.attention_weights(q, k, is_causal=True, causal_alignment="lower_right", **kw)
    assert (w - ref_w).abs().max().item() <= TOL
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g_out).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert (a - b).abs().max().item() <= TOL, f"d{name} differs"
    return out


SIZES = [(1, 1), (1, 9), (5, 6), (37, 40), (37, 50), (64, 131)]


@pytest.mark.parametrize("mode", ["none", "key_mask", "bool_mask", "float_mask"])
@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("window,block", [(0, 1), (1, 2), (3, 5), (7, 3), (20, 4)])
def test_lower_right_matches_reference(window: int, block: int, lq: int, lk: int, mode: str) -> None:
    _check_lower_right(window, block, lq, lk, mode)


@pytest.mark.parametrize("lq,lk,window,block", [(60, 63, 7, 4), (64, 131, 7, 5), (45, 46, 2, 3)])
def test_lower_right_takes_the_blocked_path(monkeypatch: pytest.MonkeyPatch, lq: int, lk: int,
                                            window: int, block: int) -> None:
    """Lq != Lk is served by the blocked path (O(Lq * window)), not a dense Lq x Lk call."""
    offsets: list[int] = []
    blocked = _blocked._blocked

    def spy(q, k, v, masks, *args):
        offsets.append(masks.q_offset)
        assert k.shape[2] == q.shape[2] + masks.q_offset  # keys before q_offset - window are dropped
        return blocked(q, k, v, masks, *args)

    monkeypatch.setattr(_blocked, "_blocked", spy)
    for mode in ("none", "key_mask", "bool_mask"):
        _check_lower_right(window, block, lq, lk, mode)
    assert offsets == [min(lk - lq, window)] * 3


def test_lower_right_is_the_last_rows_of_the_square_forward() -> None:
    attn = attnreg.build("local", window=5, block_size=4)
    q, k, v = _qkv(50, 50, grad=False)
    full = attn(q, k, v, is_causal=True)  # (B, H, 50, Ev)
    for t in (1, 7, 33):
        part = attn(q[:, :, -t:], k, v, is_causal=True, causal_alignment="lower_right")
        assert (part - full[:, :, -t:]).abs().max().item() <= TOL


@pytest.mark.parametrize("lq,lk,causal", [(5, 9, True), (9, 5, True), (5, 9, False)])
def test_other_lq_lk_still_raise(lq: int, lk: int, causal: bool) -> None:
    attn = attnreg.build("local", window=3)
    q, k, v = _qkv(lq, lk, grad=False)
    with pytest.raises((ValueError, attnreg.core.UnsupportedFeatureError)):
        attn(q, k, v, is_causal=causal)  # upper-left: not self-attention with a cache
    if causal and lq > lk:
        with pytest.raises(ValueError, match="query length must be <= key length"):
            attn(q, k, v, is_causal=True, causal_alignment="lower_right")


def _left_padding(length: int) -> torch.Tensor:
    km = torch.ones(B, length, dtype=torch.bool)
    km[0, :3] = False
    km[2, :30] = False  # longer than the prefix and than most windows
    return km


def _decode_all(attn, q, k, v, cuts, key_mask=None, state=None):
    """Decode q/k/v in the pieces [cuts[i], cuts[i+1]); returns (outputs, final state)."""
    state = state or attn.init_state(q.shape[0], H, E, EV, dtype=q.dtype)
    outs = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        km = None if key_mask is None else key_mask[:, a:b]
        o, state = attn.decode(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, key_mask=km)
        outs.append(o)
    return torch.cat(outs, dim=2), state  # (B, H, L, Ev)


# Prefill of a random-length prefix, 9 single tokens, then one multi-token chunk (longer than the
# small windows, so it takes the blocked path with an offset).
L = 67
CUTS = [0, 23, *range(24, 33), L]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("window,block", [(0, 4), (1, 2), (5, 3), (16, 4), (100, 8)])
def test_decode_equals_causal_full_forward(window: int, block: int, pad: bool) -> None:
    attn = attnreg.build("local", window=window, block_size=block)
    q, k, v = _qkv(L, L, seed=3, grad=False)
    km = _left_padding(L) if pad else None
    full = attn(q, k, v, is_causal=True, key_mask=km)  # (B, H, L, Ev)
    out, state = _decode_all(attn, q, k, v, CUTS, km)
    assert isinstance(state, LocalState) and state.length == L
    assert state.buffered == min(L, window)
    assert (out - full).abs().max().item() <= TOL
    if pad:
        assert torch.count_nonzero(out[2, :, :30]) == 0  # padded queries see only padding


def test_decode_gradients_equal_the_full_forward() -> None:
    attn = attnreg.build("local", window=4, block_size=3)
    q, k, v = _qkv(L, L, seed=4)
    km = _left_padding(L)
    g_out = torch.randn(B, H, L, EV, generator=torch.Generator().manual_seed(5), dtype=F64)
    out, _ = _decode_all(attn, q, k, v, CUTS, km)
    full = attn(q, k, v, is_causal=True, key_mask=km)
    got = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    want = torch.autograd.grad((full * g_out).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        assert (a - b).abs().max().item() <= TOL, f"d{name} differs"


def test_state_memory_is_o_window(monkeypatch: pytest.MonkeyPatch) -> None:
    window, steps = 8, 150
    attn = attnreg.build("local", window=window, block_size=4)
    q, k, v = _qkv(steps + 300, steps + 300, seed=6, grad=False)
    km = _left_padding(steps + 300)
    full_bytes = B * H * window * (E + EV) * 8 + B * window  # keys, values (float64), key_mask (bool)
    state = attn.init_state(B, H, E, EV, dtype=F64)
    _, state = _decode_all(attn, q, k, v, [0, 300], km, state)  # a long prefill chunk
    assert state.nbytes == full_bytes
    for t in state.tensors().values():  # the tail is copied out: the prefill buffer is not pinned
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    key_lens: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, **kw):
        key_lens.append(k_.shape[-2])
        return sdpa(q_, k_, v_, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for i in range(300, 300 + steps):
        _, state = attn.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], state,
                               key_mask=km[:, i:i + 1])
        assert state.nbytes == full_bytes
        for t in state.tensors().values():  # a view of this step's window + 1, never more
            assert t.untyped_storage().nbytes() <= t.numel() * t.element_size() * (window + 1) // window
    assert state.length == 300 + steps
    assert max(key_lens) == window + 1  # every step attends to window + 1 keys, whatever the context
    assert (state.key - k[:, :, 300 + steps - window:300 + steps]).abs().max() == 0


def test_state_without_padding_keeps_no_mask_and_small_contexts_keep_all() -> None:
    attn = attnreg.build("local", window=6)
    q, k, v = _qkv(4, 4, grad=False)
    _, state = _decode_all(attn, q, k, v, [0, 1, 4])
    assert state.key_mask is None and state.buffered == 4
    assert state.nbytes == B * H * 4 * (E + EV) * 8


def test_index_select_equals_decoding_the_reordered_batch() -> None:
    attn = attnreg.build("local", window=5, block_size=3)
    q, k, v = _qkv(L, L, seed=8, grad=False)
    km = _left_padding(L)
    _, state = _decode_all(attn, q, k, v, [0, 20, 21, 22], km)
    idx = torch.tensor([2, 0, 0, 1])  # a beam search step: rows repeat
    branched = state.index_select(idx)
    assert branched.batch == 4 and state.batch == B
    rq, rk, rv, rkm = q[idx], k[idx], v[idx], km[idx]
    cuts = [22, 23, 24, 40, L]
    got, _ = _decode_all(attn, rq, rk, rv, cuts, rkm, branched)
    want, _ = _decode_all(attn, rq, rk, rv, [0, 22, *cuts[1:]], rkm,
                          attn.init_state(4, H, E, EV, dtype=F64))
    assert (got - want[:, :, 22:]).abs().max().item() <= TOL
    # The original state is untouched by decoding the copy, and still continues its own batch.
    mine, _ = _decode_all(attn, q, k, v, [22, L], km, state)
    full = attn(q, k, v, is_causal=True, key_mask=km)
    assert (mine - full[:, :, 22:]).abs().max().item() <= TOL
    moved = state.to("cpu")
    assert isinstance(moved, LocalState) and moved.window == 5


def test_decode_rejects_a_foreign_state() -> None:
    attn = attnreg.build("local", window=3)
    q, k, v = _qkv(1, 1, grad=False)
    other = attnreg.build("local", window=4).init_state(B, H, E, EV, dtype=F64)
    with pytest.raises(ValueError, match=r"local \(window=3\) needs .* made by local \(window=4\)"):
        attn.decode(q, k, v, other)
    kv = KVCacheState(B, H, E, EV, F64, torch.device("cpu"))
    with pytest.raises(ValueError, match="KVCacheState made by no init_state"):
        attn.decode(q, k, v, kv)
    kv.variant, kv.fingerprint = other.variant, attn.init_state(B, H, E, EV, dtype=F64).fingerprint  # a fake
    with pytest.raises(ValueError, match="LocalState of its own init_state, got a KVCacheState"):
        attn.decode(q, k, v, kv)


def test_flops_lower_right_counts_the_band() -> None:
    attn = attnreg.build("local", window=3)
    for lq, lk in ((1, 20), (5, 9), (9, 9)):
        pairs = int(_blocked.rect_band(lq, lk, lk - lq, 3, True).sum())
        got = attn.flops(1, 1, lq, lk, E, EV, is_causal=True, causal_alignment="lower_right")
        assert got == 2 * (E + EV) * pairs
    for causal, alignment in ((False, "lower_right"), (True, "upper_left")):
        with pytest.raises(ValueError, match="q_len"):
            attn.flops(1, 1, 5, 9, E, EV, is_causal=causal, causal_alignment=alignment)
