"""linear: fast paths (non-causal matmuls, chunked causal) against the float64 quadratic reference."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import Masks, UnsupportedFeatureError, check_inputs
from attnreg.plugins.linear import LinearAttention
from attnreg.plugins.linear.kernels import segment_length
from attnreg.plugins.linear.reference import linear_reference

MAPS = ("elu", "relu", "favor")
TOL = 1e-10  # float64 fast vs reference, forward and gradients


def _module(fmap: str, chunk: int = 128, **kw: object) -> LinearAttention:
    return attnreg.build("linear", feature_map=fmap, chunk_size=chunk, num_features=32, **kw)


def _inputs(b: int, h: int, lq: int, lk: int, e: int = 8, ev: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=torch.float64)  # (B, H, Lq, E)
    k = torch.randn(b, h, lk, e, generator=g, dtype=torch.float64)  # (B, H, Lk, E)
    v = torch.randn(b, h, lk, ev, generator=g, dtype=torch.float64)  # (B, H, Lk, Ev)
    return q, k, v


def _reference(m: LinearAttention, q, k, v, masks: Masks):
    proj = m.projection(q.shape[-1], q.device, torch.float64) if m.feature_map == "favor" else None
    scale = m.softmax_scale(q.shape[-1]) if m.feature_map == "favor" else 1.0
    return linear_reference(q, k, v, masks, m.feature_map, m.eps, proj, scale)


def _check_against_reference(m: LinearAttention, q, k, v, key_mask, causal: bool) -> None:
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    masks = check_inputs("linear", m.capabilities, q, k, v, None, key_mask, causal)
    out = m(q, k, v, key_mask=key_mask, is_causal=causal)
    ref, ref_w = _reference(m, q, k, v, masks)
    assert (out - ref).abs().max().item() <= TOL
    w = m.attention_weights(q, k, key_mask=key_mask, is_causal=causal)
    assert (w - ref_w).abs().max().item() <= TOL
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g_fast = torch.autograd.grad((out * probe).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * probe).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_fast, g_ref, strict=True):
        assert torch.isfinite(a).all(), f"grad {name} not finite"
        assert (a - b).abs().max().item() <= TOL, f"grad {name}"


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 3), (129, 16), (1000, 128)])
@pytest.mark.parametrize("segment", [None, 1, 40])  # auto (one segment here), one chunk, 3+ chunks
def test_matches_reference_with_key_mask(fmap: str, causal: bool, length: int, chunk: int,
                                         segment: int | None) -> None:
    q, k, v = _inputs(2, 2, length, length, seed=length)
    key_mask = torch.rand(2, length, generator=torch.Generator().manual_seed(3)) > 0.25
    key_mask[:, 0] = True
    _check_against_reference(_module(fmap, chunk, segment_size=segment), q, k, v, key_mask, causal)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_without_masks(fmap: str, causal: bool) -> None:
    q, k, v = _inputs(1, 3, 50, 50, e=6, ev=4)
    _check_against_reference(_module(fmap, 8), q, k, v, None, causal)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(5, 11), (11, 5), (40, 17)])
@pytest.mark.parametrize("segment", [None, 3])
def test_cross_attention(fmap: str, causal: bool, lq: int, lk: int, segment: int | None) -> None:
    q, k, v = _inputs(2, 2, lq, lk)
    key_mask = torch.ones(2, lk, dtype=torch.bool)
    key_mask[1, -2:] = False
    _check_against_reference(_module(fmap, 4, segment_size=segment), q, k, v, key_mask, causal)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_segment_sizes_agree(fmap: str, causal: bool) -> None:
    """Streaming is exact: every segment length (odd ones, more than L) gives the same result."""
    q, k, v = _inputs(1, 2, 301, 301)
    outs = [_module(fmap, 8, segment_size=s)(q, k, v, is_causal=causal) for s in (None, 1, 13, 64, 500)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() <= 1e-12


def test_segment_length_rounds_to_whole_chunks() -> None:
    assert segment_length(8, 65, 128) == 2048  # auto: about 1M elements of (B*H) x width
    assert segment_length(8, 65, 128, 1) == 128
    assert segment_length(8, 65, 16, 40) == 48
    assert segment_length(10**6, 65, 4) == 4  # never below one chunk


@pytest.mark.parametrize("fmap", MAPS)
def test_chunk_sizes_agree(fmap: str) -> None:
    q, k, v = _inputs(1, 2, 300, 300)
    outs = [_module(fmap, c)(q, k, v, is_causal=True) for c in (1, 5, 64, 128, 300, 512)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_weights_times_value(fmap: str, causal: bool) -> None:
    q, k, v = _inputs(2, 2, 33, 33)
    km = torch.ones(2, 33, dtype=torch.bool)
    km[0, 20:] = False
    m = _module(fmap, 8)
    w = m.attention_weights(q, k, key_mask=km, is_causal=causal)
    assert (m(q, k, v, key_mask=km, is_causal=causal) - w @ v).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", ("elu", "favor"))
@pytest.mark.parametrize("causal", [False, True])
def test_rows_sum_to_one_or_zero(fmap: str, causal: bool) -> None:
    q, k, _ = _inputs(2, 2, 20, 20)
    km = torch.ones(2, 20, dtype=torch.bool)
    km[0] = False  # batch 0: nothing to attend
    km[1, :3] = False
    w = _module(fmap).attention_weights(q, k, key_mask=km, is_causal=causal)
    sums = w.sum(-1)  # (B, H, Lq)
    dead = torch.zeros_like(sums, dtype=torch.bool)
    dead[0] = True
    if causal:
        dead[1, :, :3] = True  # rows whose only keys are padding
    assert (sums[dead] == 0).all()
    assert (sums[~dead] - 1).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_zero_with_finite_grads(fmap: str, causal: bool) -> None:
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 2, 9, 9))
    km = torch.ones(2, 9, dtype=torch.bool)
    km[0] = False
    out = _module(fmap, 4)(q, k, v, key_mask=km, is_causal=causal)
    assert (out[0] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[0] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_relu_zero_normaliser_row_is_zero(causal: bool) -> None:
    """A relu query with no positive overlap with any key has normaliser 0: weights and output 0."""
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 1, 6, 6))
    with torch.no_grad():
        q[0, 0, 2] = -q[0, 0, 2].abs() - 0.1  # relu(q_2) = 0
    m = _module("relu", 4)
    out = m(q, k, v, is_causal=causal)
    w = m.attention_weights(q, k, is_causal=causal)
    assert (out[0, 0, 2] == 0).all() and (w[0, 0, 2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[0, 0, 2] == 0).all()


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_poison_does_not_leak(fmap: str, causal: bool) -> None:
    q, k, v = _inputs(2, 2, 17, 17)
    km = torch.ones(2, 17, dtype=torch.bool)
    km[:, 12:] = False
    km[1, 5] = False
    m = _module(fmap, 4)
    clean = m(q, k, v, key_mask=km, is_causal=causal)
    k2, v2 = k.clone(), v.clone()
    pad = ~km[:, None, :, None]  # (B, 1, Lk, 1)
    k2 = k2.masked_fill(pad, 1e9)
    v2 = v2.masked_fill(pad, 1e9)
    poisoned = m(q, k2, v2, key_mask=km, is_causal=causal)
    assert (poisoned - clean).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("lead_padding", [0, 3])
def test_no_future_leakage_bit_exact(fmap: str, lead_padding: int) -> None:
    """Changing tokens after t leaves outputs <= t bit-for-bit equal (FAVOR's stabiliser too)."""
    q, k, v = _inputs(1, 2, 40, 40)
    km = torch.ones(1, 40, dtype=torch.bool)
    km[:, :lead_padding] = False
    m = _module(fmap, 8)
    k, v = k.requires_grad_(True), v.requires_grad_(True)
    base = m(q, k, v, key_mask=km, is_causal=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 25:] = torch.randn(1, 2, 15, 8, dtype=torch.float64) * 3
    v2[:, :, 25:] = 7.0
    moved = m(q, k2, v2, key_mask=km, is_causal=True)
    assert torch.equal(moved[:, :, :25], base[:, :, :25])
    assert (moved[:, :, 25:] - base[:, :, 25:]).abs().max().item() > 1e-3
    base[:, :, :25].sum().backward()
    assert (k.grad[:, :, 25:] == 0).all() and (v.grad[:, :, 25:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_large_magnitudes_stay_finite(dtype, fmap: str, causal: bool) -> None:
    q, k, v = _inputs(1, 2, 70, 70, e=16, ev=8)
    m = _module(fmap, 16)
    # Normal magnitudes: close to the float64 computation of the same module.
    out = m(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=causal)
    assert out.dtype == dtype
    ref = m(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), is_causal=causal)
    assert (out.double() - ref).abs().max().item() <= (2e-2 if dtype == torch.bfloat16 else 4e-3)
    # Large magnitudes: elu features ~1e4, products ~1e8 (overflow in half), FAVOR exponents ~-1e6.
    big = [(t * 3e3).to(dtype).requires_grad_(True) for t in (q, k)]
    vb = (v * 1e3).to(dtype).requires_grad_(True)
    out = m(big[0], big[1], vb, is_causal=causal)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    for t in (*big, vb):
        assert torch.isfinite(t.grad).all()


def test_dense_attn_mask_is_unsupported() -> None:
    q, k, v = _inputs(1, 1, 4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    m = _module("elu")
    with pytest.raises(UnsupportedFeatureError, match="linear.*attn_mask"):
        m(q, k, v, attn_mask=mask)
    with pytest.raises(UnsupportedFeatureError, match="linear"):
        attnreg.build("linear", dropout=0.1)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(37, 37), (41, 23)])
def test_transposed_layout_inputs(fmap: str, causal: bool, lq: int, lk: int) -> None:
    """(B, L, H, E).transpose(1, 2), the usual layout after a projection, with B > 1 and segments."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 3, d, generator=g, dtype=torch.float64).transpose(1, 2)
               for n, d in ((lq, 8), (lk, 8), (lk, 5)))  # (B, H, L, E) views, not contiguous
    assert not q.is_contiguous()
    key_mask = torch.ones(2, lk, dtype=torch.bool)
    key_mask[1, -3:] = False
    for segment in (None, 8):
        _check_against_reference(_module(fmap, 4, segment_size=segment), q, k, v, key_mask, causal)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradient_of_any_subset_of_inputs(fmap: str, causal: bool) -> None:
    """Backward skips the gradients nobody asked for; the ones asked for are unchanged."""
    q, k, v = _inputs(2, 2, 45, 45)
    m = _module(fmap, 4, segment_size=8)
    probe = torch.randn(2, 2, 45, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad((m(*full, is_causal=causal) * probe).sum(), full)
    for i in range(3):
        ins = [t.clone().requires_grad_(j == i) for j, t in enumerate((q, k, v))]
        (got,) = torch.autograd.grad((m(*ins, is_causal=causal) * probe).sum(), ins[i])
        assert (got - want[i]).abs().max().item() <= 1e-12, "qkv"[i]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_gradients_match_float64(dtype, fmap: str, causal: bool) -> None:
    """Half inputs, several segments: gradients close to float64 on the same (rounded) inputs."""
    q, k, v = (t.to(dtype) for t in _inputs(1, 2, 70, 70, e=16, ev=8))
    m = _module(fmap, 8, segment_size=16)
    probe = torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(4))
    grads = {}
    for dt in (dtype, torch.float64):
        ins = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        out = m(*ins, is_causal=causal)
        grads[dt] = torch.autograd.grad((out.double() * probe.double()).sum(), ins)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # measured at most 6.3e-3 and 4.3e-4
    for name, a, b in zip("qkv", grads[dtype], grads[torch.float64], strict=True):
        assert a.dtype == dtype, name
        err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        assert err <= tol, f"grad {name}: relative error {err:.2e}"
