"""dot_product: equal to torch SDPA (fp32) and to the float64 textbook reference, forward and
input gradients, for every mask form, causal, cross attention, odd lengths and empty rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.dot_product.reference import dot_product_reference

B, H, E, EV = 2, 3, 8, 5


def _inputs(lq: int, lk: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, E, generator=g, dtype=dtype, requires_grad=True)  # (B, H, Lq, E)
    k = torch.randn(B, H, lk, E, generator=g, dtype=dtype, requires_grad=True)  # (B, H, Lk, E)
    v = torch.randn(B, H, lk, EV, generator=g, dtype=dtype, requires_grad=True)  # (B, H, Lk, Ev)
    return q, k, v


def _masks(kind: str, lq: int, lk: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}
    if kind == "bool4d":
        return {"attn_mask": torch.rand(B, H, lq, lk, generator=g) > 0.3}
    if kind == "bool_broadcast_2d":
        return {"attn_mask": torch.rand(lq, lk, generator=g) > 0.3}
    if kind == "bool_broadcast_b11k":
        return {"attn_mask": torch.rand(B, 1, 1, lk, generator=g) > 0.3}
    if kind == "float":
        return {"attn_mask": torch.randn(1, H, lq, lk, generator=g, dtype=dtype)}
    if kind == "key_mask":
        km = torch.ones(B, lk, dtype=torch.bool)
        km[0, lk // 2:] = False  # padding at the end of item 0
        return {"key_mask": km}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "combined":
        km = torch.ones(B, lk, dtype=torch.bool)
        km[1, 0] = False
        return {"attn_mask": torch.rand(lq, lk, generator=g) > 0.2, "key_mask": km, "is_causal": True}
    raise AssertionError(kind)


def _sdpa_equivalent(q, k, v, kw: dict):
    """Plain SDPA call with one combined mask (only valid where no row is empty)."""
    masks = check_inputs("dot_product", attnreg.get_variant("dot_product").capabilities,
                         q, k, v, kw.get("attn_mask"), kw.get("key_mask"), kw.get("is_causal", False))
    mask = masks.allowed()
    if masks.float_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks.float_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


MASKS = ["none", "bool4d", "bool_broadcast_2d", "bool_broadcast_b11k", "float", "key_mask", "causal",
         "combined"]
LENGTHS = [(1, 1), (7, 7), (129, 129), (7, 13), (13, 7)]


def _grads(out, *tensors):
    torch.manual_seed(3)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), tensors)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_matches_float64_reference(kind: str, lq: int, lk: int) -> None:
    attn = attnreg.build("dot_product")
    q, k, v = _inputs(lq, lk, torch.float64)
    kw = _masks(kind, lq, lk, torch.float64)
    out = attn(q, k, v, **kw)
    masks = check_inputs("dot_product", attn.capabilities, q, k, v, kw.get("attn_mask"),
                         kw.get("key_mask"), kw.get("is_causal", False))
    ref, weights = dot_product_reference(q, k, v, masks)
    assert out.dtype == torch.float64 and out.shape == (B, H, lq, EV)
    assert (out - ref).abs().max().item() <= 1e-12
    for g_fast, g_ref in zip(_grads(out, q, k, v), _grads(ref, q, k, v), strict=True):
        assert torch.isfinite(g_fast).all()
        assert (g_fast - g_ref).abs().max().item() <= 1e-12
    w = attn.attention_weights(q, k, **kw)
    assert (w - weights).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_matches_torch_sdpa_fp32(kind: str, lq: int, lk: int) -> None:
    attn = attnreg.build({"variant": "dot_product"})
    q, k, v = _inputs(lq, lk, torch.float32)
    kw = _masks(kind, lq, lk, torch.float32)
    out = attn(q, k, v, **kw)
    expected = _sdpa_equivalent(q, k, v, kw)
    live = torch.isfinite(expected).all(-1, keepdim=True)  # SDPA's own empty rows are undefined
    assert (out - expected).abs().masked_select(live).max().item() <= 1e-6
    for g_fast, g_sdpa in zip(_grads(out, q, k, v), _grads(expected, q, k, v), strict=True):
        if torch.isfinite(g_sdpa).all():
            assert (g_fast - g_sdpa).abs().max().item() <= 1e-5


@pytest.mark.parametrize("form", ["bool", "float", "key_mask", "causal_short_keys"])
def test_fully_masked_rows_give_zero_and_finite_grads(form: str) -> None:
    attn = attnreg.build("sdpa")
    lq, lk = 6, 6
    q, k, v = _inputs(lq, lk, torch.float64)
    if form == "bool":
        m = torch.ones(lq, lk, dtype=torch.bool)
        m[2] = False  # query 2 may attend nothing
        kw, dead = {"attn_mask": m}, (slice(None), slice(None), 2)
    elif form == "float":
        m = torch.zeros(lq, lk, dtype=torch.float64)
        m[2] = float("-inf")
        kw, dead = {"attn_mask": m}, (slice(None), slice(None), 2)
    elif form == "key_mask":
        km = torch.ones(B, lk, dtype=torch.bool)
        km[1] = False  # item 1 is all padding
        kw, dead = {"key_mask": km}, (1,)
    else:
        km = torch.ones(B, lk, dtype=torch.bool)
        km[0, 0] = False  # causal row 0 only sees key 0, which is padding
        kw, dead = {"key_mask": km, "is_causal": True}, (0, slice(None), 0)
    out = attn(q, k, v, **kw)
    assert torch.isfinite(out).all()
    assert (out[dead] == 0).all()
    gq, gk, gv = _grads(out, q, k, v)
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert (gq[dead] == 0).all()
    assert (attn.attention_weights(q, k, **kw)[dead] == 0).all()


def test_three_build_forms_and_yaml_give_the_same_module(tmp_path) -> None:
    path = tmp_path / "attn.yaml"
    path.write_text("variant: sdpa\nscale: 0.25\n")
    modules = [
        attnreg.build({"variant": "dot_product", "scale": 0.25}),
        attnreg.build("sdpa", scale=0.25),
        attnreg.build("scaled_dot_product", scale=0.25),
        attnreg.build(attnreg.load_config(path)),
    ]
    q, k, v = _inputs(9, 9, torch.float32)
    outs = [m(q, k, v) for m in modules]
    assert all(type(m) is type(modules[0]) and m.config == modules[0].config for m in modules)
    assert all(torch.equal(o, outs[0]) for o in outs)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert (outs[0] - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_float_dtypes(dtype: torch.dtype) -> None:
    attn = attnreg.build("dot_product")
    q, k, v = (t.detach().to(dtype) for t in _inputs(33, 17, torch.float64))
    km = torch.ones(B, 17, dtype=torch.bool)
    km[0, 3:] = False
    out = attn(q, k, v, key_mask=km, is_causal=True)
    assert out.dtype == dtype
    masks = check_inputs("dot_product", attn.capabilities, q, k, v, None, km, True)
    ref, _ = dot_product_reference(q, k, v, masks)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert (out.double() - ref).abs().max().item() <= tol


def test_dropout_only_in_train_mode_and_seeded() -> None:
    attn = attnreg.build("dot_product", dropout=0.5)
    q, k, v = (t.detach() for t in _inputs(16, 16, torch.float32))
    attn.eval()
    assert torch.equal(attn(q, k, v), attnreg.build("dot_product")(q, k, v))
    attn.train()
    torch.manual_seed(0)
    a = attn(q, k, v)
    torch.manual_seed(0)
    b = attn(q, k, v)
    assert torch.equal(a, b)
    assert not torch.allclose(a, attn.eval()(q, k, v))
