"""local (sliding-window): the blocked fast path equals the float64 dense reference (forward and
gradients) for every window / length / mask combination, never builds an L x L tensor, and keeps
empty rows at 0 with finite gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnreg
from attnreg.core import ConfigError, UnsupportedFeatureError, check_inputs
from attnreg.plugins.local.reference import local_reference

B, H, E, EV = 2, 2, 8, 5
TOL = 1e-10


def _inputs(length: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, E, generator=g, dtype=dtype, requires_grad=True)  # (B, H, L, E)
    k = torch.randn(B, H, length, E, generator=g, dtype=dtype, requires_grad=True)  # (B, H, L, E)
    v = torch.randn(B, H, length, EV, generator=g, dtype=dtype, requires_grad=True)  # (B, H, L, Ev)
    return q, k, v


def _check(window: int, length: int, block: int = 16, seed: int = 0, **kw) -> torch.Tensor:
    """Fast path vs float64 reference: output and input gradients within TOL. Returns the output."""
    attn = attnreg.build("local", window=window, block_size=block)
    q, k, v = _inputs(length, seed)
    out = attn(q, k, v, **kw)
    masks = check_inputs("local", attn.capabilities, q, k, v, kw.get("attn_mask"), kw.get("key_mask"),
                         kw.get("is_causal", False))
    ref, _ = local_reference(q, k, v, masks, window)
    assert out.shape == (B, H, length, EV) and out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= TOL
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    got = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g_out).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert (a - b).abs().max().item() <= TOL, f"d{name} differs"
    return out


def _key_mask(length: int, where: str) -> torch.Tensor:
    km = torch.ones(B, length, dtype=torch.bool)
    if where == "end":
        km[0, length // 2:] = False  # item 0 padded at the end, item 1 full
    else:
        km[1, length // 3: 2 * length // 3 + 1] = False  # a hole in the middle of item 1
    return km


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 5, 129, 1000])
@pytest.mark.parametrize("window", [0, 1, 3, 64, 1500])
def test_matches_reference(window: int, length: int, causal: bool) -> None:
    _check(window, length, is_causal=causal)


@pytest.mark.parametrize("block", [1, 4, 7, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sizes_agree(block: int, causal: bool) -> None:
    _check(5, 131, block=block, is_causal=causal)


@pytest.mark.parametrize("where", ["end", "middle"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,length", [(0, 129), (3, 129), (64, 1000), (200, 129)])
def test_key_mask(window: int, length: int, causal: bool, where: str) -> None:
    _check(window, length, key_mask=_key_mask(length, where), is_causal=causal)


@pytest.mark.parametrize("shape", [(B, H, 129, 129), (129, 129), (B, 1, 1, 129), (129, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_bool_attn_mask_and_key_mask(shape: tuple[int, ...], causal: bool) -> None:
    g = torch.Generator().manual_seed(5)
    attn_mask = torch.rand(shape, generator=g) > 0.3
    _check(3, 129, attn_mask=attn_mask, key_mask=_key_mask(129, "middle"), is_causal=causal)


def test_float_attn_mask() -> None:
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(1, H, 129, 129, generator=g, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(129, 129, generator=g) < 0.2, float("-inf"))
    _check(4, 129, attn_mask=bias, key_mask=_key_mask(129, "end"))


@pytest.mark.parametrize("window,length", [(3, 129), (2, 5), (64, 1000)])
def test_fully_masked_rows_are_zero_with_finite_grads(window: int, length: int) -> None:
    km = torch.ones(B, length, dtype=torch.bool)
    km[1] = False  # item 1: nothing to attend anywhere
    km[0, : length // 2] = False  # item 0: queries far from the real half see nothing either
    attn_mask = torch.ones(length, length, dtype=torch.bool)
    attn_mask[length - 1] = False  # the last query row of every item is empty
    out = _check(window, length, key_mask=km, attn_mask=attn_mask)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(out[:, :, length - 1]) == 0
    assert torch.count_nonzero(out[0, :, : max(0, length // 2 - window)]) == 0  # see only padding
    assert torch.count_nonzero(out[0, :, length // 2: length - 1]) > 0


def test_fast_path_never_builds_l_by_l(monkeypatch: pytest.MonkeyPatch) -> None:
    length, window, block = 1000, 3, 16
    shapes: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = attnreg.build("local", window=window, block_size=block)
    q, k, v = _inputs(length)
    attn(q, k, v, key_mask=_key_mask(length, "middle")).sum().backward()
    span = block + 2 * window
    assert shapes, "SDPA was not called"
    assert shapes[0] == ((B * H, length // block - 1, span, E), (1, 1, block, span))  # one shared band
    for key_shape, mask_shape in shapes:
        assert key_shape[2] < 64 and (mask_shape is None or mask_shape[-1] < 64)


def test_noncontiguous_inputs() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, 300, H, E, generator=g, dtype=torch.float64)  # (B, L, H, E) model layout
    q = k = v = x.transpose(1, 2)  # (B, H, L, E), not contiguous
    attn = attnreg.build("local", window=7, block_size=16)
    masks = check_inputs("local", attn.capabilities, q, k, v, None, None, True)
    ref, _ = local_reference(q, k, v, masks, 7)
    assert (attn(q, k, v, is_causal=True) - ref).abs().max() <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype: torch.dtype, tol: float) -> None:
    attn = attnreg.build("local", window=5, block_size=16)
    q, k, v = (t.detach() for t in _inputs(200, dtype=torch.float64))
    masks = check_inputs("local", attn.capabilities, q, k, v, None, None, False)
    ref, _ = local_reference(q, k, v, masks, 5)
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= tol * 4


def test_weights_pattern_flops_and_baseline() -> None:
    attn = attnreg.build("local", window=3, block_size=16)
    q, k, v = (t.detach() for t in _inputs(50))
    for causal in (False, True):
        w = attn.attention_weights(q, k, is_causal=causal)  # (B, H, L, L)
        pattern = attn.pattern_mask(50, is_causal=causal)  # (L, L)
        assert torch.equal(w != 0, pattern.expand_as(w))
        assert torch.allclose(w.sum(-1), torch.ones(B, H, 50, dtype=w.dtype))
        assert (attn(q, k, v, is_causal=causal) - w @ v).abs().max() <= TOL
        baseline = attn.benchmark_baselines()["sdpa_dense_band"](q, k, v, causal)
        assert (baseline - w @ v).abs().max() <= TOL
        pairs = int(pattern.sum())
        assert attn.flops(B, H, 50, 50, E, EV, causal) == 2 * (E + EV) * pairs * B * H
    assert attn.pattern_mask(4).tolist() == [[abs(i - j) <= 3 for j in range(4)] for i in range(4)]


@pytest.mark.parametrize("window", [0, 1, 3, 9, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_mask_is_the_definition(window: int, causal: bool) -> None:
    attn = attnreg.build("local", window=window)
    got = attn.pattern_mask(11, is_causal=causal)  # (L, L)
    want = [[abs(i - j) <= window and (j <= i or not causal) for j in range(11)] for i in range(11)]
    assert got.dtype == torch.bool and got.tolist() == want


def test_dropout() -> None:
    attn = attnreg.build("local", window=4, block_size=16, dropout=0.5)
    q, k, _ = (t.detach() for t in _inputs(300))
    v = torch.ones(B, H, 300, EV, dtype=torch.float64)  # output row = (sum of kept weights) / (1 - p)
    attn.eval()
    assert torch.allclose(attn(q, k, v), torch.ones(B, H, 300, EV, dtype=torch.float64))
    attn.train()
    torch.manual_seed(0)
    a = attn(q, k, v)
    torch.manual_seed(0)
    b = attn(q, k, v)
    torch.manual_seed(1)
    c = attn(q, k, v)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, torch.ones_like(a))  # dropout acts in train mode
    assert abs(a.mean().item() - 1.0) < 0.05  # inverted dropout keeps the expectation
    assert torch.isfinite(a).all()


def test_cross_attention_unsupported() -> None:
    attn = attnreg.build("local", window=2)
    q = torch.randn(1, 1, 5, 4)
    k = torch.randn(1, 1, 7, 4)
    with pytest.raises(UnsupportedFeatureError, match="cross attention"):
        attn(q, k, k)


def test_config() -> None:
    attn = attnreg.build("sliding_window")
    assert attn.config.variant == "local" and attn.window == 128 and attn.block_size == 64
    assert attnreg.build({"variant": "window", "window": 0}).window == 0
    for bad in ({"window": -1}, {"block_size": 0}, {"dropout": 1.0}):
        with pytest.raises(ConfigError):
            attnreg.build("local", **bad)
    spec = attnreg.get_variant("local")
    assert set(spec.aliases) == {"sliding_window", "window"}
    assert not spec.capabilities.cross_attention and not spec.capabilities.permutation_invariant


def test_mask_caches_are_bounded_and_owned() -> None:
    import copy
    import gc
    import weakref

    from attnreg.plugins.local import _blocked

    _blocked.clear_mask_cache()
    attn = attnreg.build("local", window=512, block_size=64)
    x = torch.randn(1, 1, 1700, 4, dtype=torch.float64)
    with torch.no_grad():
        first = attn(x, x, x)
    # The big edge masks (> 64K elements) live in the module, never in the process-wide cache.
    assert attn._mask_cache.nbytes > 0
    shared = _blocked._SHARED
    assert all(t.numel() <= shared.max_elements for t in shared.values())
    assert not any("cache" in name for name in attn.state_dict())
    assert copy.deepcopy(attn)._mask_cache.nbytes == 0
    held = weakref.ref(next(iter(attn._mask_cache.values())))
    with torch.no_grad():  # served from the caches: same result
        torch.testing.assert_close(attn(x, x, x), first, atol=0, rtol=0)
    del attn
    gc.collect()
    assert held() is None, "edge masks must be freed with their module"
    for length in range(300, 300 + shared.entries + 8):  # many shapes: the shared cache stays capped
        with torch.no_grad():
            attnreg.build("local", window=16, block_size=16)(*(torch.randn(1, 1, length, 4),) * 3)
    assert len(shared) <= shared.entries
