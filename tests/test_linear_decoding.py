"""linear / performer: lower-right causal alignment and the recurrent decoding state, against the
float64 quadratic reference and the causal full forward."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.linear import LinearAttention
from attnreg.plugins.linear.decoding import LinearState
from attnreg.plugins.linear.reference import linear_reference

MAPS = ("elu", "relu", "favor")
TOL = 1e-10  # float64, forward and gradients


def _module(fmap: str, chunk: int = 4, segment: int | None = 8) -> LinearAttention:
    return attnreg.build("linear", feature_map=fmap, chunk_size=chunk, segment_size=segment,
                         num_features=24)


def _inputs(b: int, h: int, lq: int, lk: int, e: int = 6, ev: int = 5, seed: int = 0, std: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=torch.float64) * std  # (B, H, Lq, E)
    k = torch.randn(b, h, lk, e, generator=g, dtype=torch.float64) * std  # (B, H, Lk, E)
    v = torch.randn(b, h, lk, ev, generator=g, dtype=torch.float64)  # (B, H, Lk, Ev)
    return q, k, v


def _reference(m: LinearAttention, q, k, v, key_mask, alignment: str = "lower_right"):
    masks = check_inputs("linear", m.capabilities, q, k, v, None, key_mask, True, alignment)
    proj = m.projection(q.shape[-1], q.device, torch.float64) if m.feature_map == "favor" else None
    scale = m.softmax_scale(q.shape[-1]) if m.feature_map == "favor" else 1.0
    return linear_reference(q, k, v, masks, m.feature_map, m.eps, proj, scale)


def _left_padding(b: int, length: int, pads: tuple[int, ...]) -> torch.Tensor:
    km = torch.ones(b, length, dtype=torch.bool)  # (B, L)
    for row, p in enumerate(pads):
        km[row, :p] = False
    return km


def _grads(out, probe, inputs):
    return torch.autograd.grad((out * probe).sum(), inputs)


# -- lower-right alignment in forward / attention_weights ----------------------------------------
@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("lq,lk", [(5, 11), (1, 9), (13, 31), (11, 5), (4, 4)])
@pytest.mark.parametrize("segment", [None, 3])
def test_lower_right_matches_reference(fmap: str, lq: int, lk: int, segment: int | None) -> None:
    """Query i sees keys j <= i + Lk - Lq (Lq > Lk: the first Lq - Lk queries see nothing -> 0)."""
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 2, lq, lk, seed=lq * 100 + lk))
    km = _left_padding(2, lk, (0, 3))
    km[0, lk // 2] = False  # a hole too
    m = _module(fmap, 4, segment)
    out = m(q, k, v, key_mask=km, is_causal=True, causal_alignment="lower_right")
    ref, ref_w = _reference(m, q, k, v, km)
    assert (out - ref).abs().max().item() <= TOL
    w = m.attention_weights(q, k, key_mask=km, is_causal=True, causal_alignment="lower_right")
    assert (w - ref_w).abs().max().item() <= TOL
    if lq > lk:
        assert (out[:, :, : lq - lk] == 0).all()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for name, a, b in zip("qkv", _grads(out, probe, (q, k, v)), _grads(ref, probe, (q, k, v)), strict=True):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max().item() <= TOL, f"grad {name}"


@pytest.mark.parametrize("fmap", MAPS)
def test_lower_right_differs_from_upper_left(fmap: str) -> None:
    """The offset is really applied: the last query sees every key, not only the first Lq."""
    q, k, v = _inputs(1, 2, 3, 10)
    m = _module(fmap)
    lower = m(q, k, v, is_causal=True, causal_alignment="lower_right")
    upper = m(q, k, v, is_causal=True)
    assert (lower - upper).abs().max().item() > 1e-3
    everything = m(q[:, :, -1:], k, v)  # non-causal: the last query sees all keys
    assert (lower[:, :, -1:] - everything).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", MAPS)
def test_lower_right_gradient_subsets(fmap: str) -> None:
    """Backward with only some inputs requiring grad (prefix keys take the non-chunked branch)."""
    q, k, v = _inputs(2, 2, 9, 23)
    m = _module(fmap, 4, 4)
    probe = torch.randn(2, 2, 9, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = _grads(m(*full, is_causal=True, causal_alignment="lower_right"), probe, full)
    for i in range(3):
        ins = [t.clone().requires_grad_(j == i) for j, t in enumerate((q, k, v))]
        out = m(*ins, is_causal=True, causal_alignment="lower_right")
        (got,) = torch.autograd.grad((out * probe).sum(), ins[i])
        assert (got - want[i]).abs().max().item() <= 1e-12, "qkv"[i]


# -- decoding ----------------------------------------------------------------------------------
def _decode_in_pieces(m: LinearAttention, q, k, v, km, cuts: list[int]):
    """Outputs of decoding the sequence in the pieces [cuts[i], cuts[i+1]), and the final state."""
    b, h, _, e = q.shape
    state = m.init_state(b, h, e, v.shape[-1], dtype=q.dtype)
    outs = []
    for a, z in zip(cuts, cuts[1:], strict=False):
        piece = None if km is None else km[:, a:z]
        out, state = m.decode(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state, key_mask=piece)
        outs.append(out)
    return torch.cat(outs, dim=2), state  # (B, H, L, Ev)


# prefill (more than a chunk: the streamed kernel), single tokens, a short chunk (<= chunk_size:
# the direct update), a long chunk; lengths odd, chunk 4, segment 8.
CUTS = [0, 19, 20, 21, 22, 25, 26, 43, 44]


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("pads", [None, (0, 4, 21)])  # row 2: padding past the prefill
def test_decoding_equals_causal_full_forward(fmap: str, pads: tuple[int, ...] | None) -> None:
    length = CUTS[-1]
    q, k, v = (t.requires_grad_(True) for t in _inputs(3, 2, length, length, seed=7))
    km = None if pads is None else _left_padding(3, length, pads)
    m = _module(fmap)
    full = m(q, k, v, key_mask=km, is_causal=True)
    dec, state = _decode_in_pieces(m, q, k, v, km, CUTS)
    assert state.length == length
    assert (dec - full).abs().max().item() <= TOL
    ref, _ = _reference(m, q, k, v, km, "upper_left")
    assert (dec - ref).abs().max().item() <= TOL
    if pads is not None:
        assert (dec[2, :, :21] == 0).all()  # nothing real to attend yet: 0, as in the full forward
    # The state is differentiable: gradients reach earlier calls' keys and values.
    probe = torch.randn(dec.shape, generator=torch.Generator().manual_seed(3), dtype=dec.dtype)
    for name, a, b in zip("qkv", _grads(dec, probe, (q, k, v)), _grads(full, probe, (q, k, v)), strict=True):
        assert (a - b).abs().max().item() <= TOL, f"grad {name}"


@pytest.mark.parametrize("fmap", MAPS)
def test_decoding_state_holds_the_sums(fmap: str) -> None:
    """After a prefill, kv_sum / key_sum are sum phi(k_j) v_j^T and sum phi(k_j) over real keys
    (for favor up to the stabiliser, a positive factor per (batch, head))."""
    q, k, v = _inputs(2, 2, 11, 11)
    km = _left_padding(2, 11, (0, 4))
    m = _module(fmap)
    _, state = _decode_in_pieces(m, q, k, v, km, [0, 11])
    assert isinstance(state, LinearState) and state.kv_sum.shape == (2, 2, state.kv.shape[2], 5)
    if fmap == "favor":
        assert torch.isfinite(state.anchor).all()
        return
    phi = torch.nn.functional.elu(k) + 1 if fmap == "elu" else torch.relu(k)  # (B, H, L, F)
    phi = phi * km[:, None, :, None]
    assert (state.kv_sum - phi.mT @ v).abs().max().item() <= 1e-12
    assert (state.key_sum - phi.sum(2)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", MAPS)
def test_decoding_large_favor_exponents(fmap: str) -> None:
    """Keys far larger than the first one (FAVOR+ exponents far above the anchor): still equal."""
    q, k, v = _inputs(2, 1, 30, 30, std=0.3, seed=4)
    k[:, :, 10:] *= 8.0
    km = _left_padding(2, 30, (0, 2))
    m = _module(fmap)
    full = m(q, k, v, key_mask=km, is_causal=True)
    dec, _ = _decode_in_pieces(m, q, k, v, km, [0, 3, 4, 13, 14, 30])
    scale = full.abs().max().item()
    assert (dec - full).abs().max().item() <= TOL * max(1.0, scale)


@pytest.mark.parametrize("fmap", MAPS)
def test_decoding_padding_poison_does_not_leak(fmap: str) -> None:
    q, k, v = _inputs(2, 2, 15, 15)
    km = _left_padding(2, 15, (3, 6))
    m = _module(fmap)
    clean, _ = _decode_in_pieces(m, q, k, v, km, [0, 7, 8, 15])
    pad = ~km[:, None, :, None]  # (B, 1, L, 1)
    dirty, state = _decode_in_pieces(m, q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, 1e30),
                                     km, [0, 7, 8, 15])
    assert torch.equal(clean, dirty)
    assert all(torch.isfinite(t).all() for t in state.tensors().values())


@pytest.mark.parametrize("fmap", MAPS)
def test_nbytes_constant_over_many_steps(fmap: str) -> None:
    m = _module(fmap)
    q, k, v = _inputs(1, 2, 300, 300)
    state = m.init_state(1, 2, 6, 5, dtype=torch.float64)
    sizes = {state.nbytes}
    _, state = m.decode(q[:, :, :100], k[:, :, :100], v[:, :, :100], state)
    sizes.add(state.nbytes)
    for t in range(100, 300):
        _, state = m.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        sizes.add(state.nbytes)
    features = 24 if fmap == "favor" else 6
    assert sizes == {2 * features * 6 * 8 + (2 * 8 if fmap == "favor" else 0)}
    assert state.length == 300


@pytest.mark.parametrize("fmap", MAPS)
def test_index_select_equals_decoding_the_reordered_batch(fmap: str) -> None:
    q, k, v = _inputs(3, 2, 16, 16, seed=9)
    km = _left_padding(3, 16, (0, 2, 9))
    m = _module(fmap)
    _, state = _decode_in_pieces(m, q[:, :, :10], k[:, :, :10], v[:, :, :10], km[:, :10], [0, 9, 10])
    idx = torch.tensor([2, 0, 0, 1])
    branch = state.index_select(idx)
    got, _ = m.decode(q[idx, :, 10:], k[idx, :, 10:], v[idx, :, 10:], branch, key_mask=km[idx, 10:])
    want, _ = _decode_in_pieces(m, q[idx], k[idx], v[idx], km[idx], [0, 9, 10, 16])
    assert (got - want[:, :, 10:]).abs().max().item() <= TOL
    # The original state is untouched by decoding the copy: it still continues its own batch.
    own, _ = m.decode(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], state, key_mask=km[:, 10:])
    full = m(q, k, v, key_mask=km, is_causal=True)
    assert (own - full[:, :, 10:]).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmap", MAPS)
def test_half_decoding_accumulates_in_float32(dtype: torch.dtype, fmap: str) -> None:
    q, k, v = (t.to(dtype) for t in _inputs(1, 2, 21, 21))
    m = _module(fmap)
    dec, state = _decode_in_pieces(m, q, k, v, None, [0, 9, 10, 21])
    assert dec.dtype == dtype and state.kv.dtype == torch.float32
    full64 = m(q.double(), k.double(), v.double(), is_causal=True)
    assert (dec.double() - full64).abs().max().item() <= (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_decode_rejects_a_foreign_state() -> None:
    elu, favor = _module("elu"), _module("favor")
    q, k, v = _inputs(1, 2, 1, 1)
    with pytest.raises(ValueError, match="feature_map='favor'.*own init_state"):
        favor.decode(q, k, v, elu.init_state(1, 2, 6, 5, dtype=torch.float64))
    kv_cache = attnreg.build("dot_product").init_state(1, 2, 6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="own init_state"):
        elu.decode(q, k, v, kv_cache)
    with pytest.raises(ValueError, match="num_features|F=24"):
        favor.decode(q, k, v, attnreg.build("performer", num_features=8).init_state(
            1, 2, 6, 5, dtype=torch.float64))
