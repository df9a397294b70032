"""sparse / bigbird: the block-gather fast path against the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.sparse import SparseAttention, SparseConfig, sparse_reference

LAYOUTS = ["bigbird", "strided", "fixed", "custom"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _custom_layout(nb: int, seed: int = 0) -> torch.Tensor:
    """A random (nb, nb) layout with non-empty rows; some rows only look ahead (empty when causal)."""
    g = torch.Generator().manual_seed(seed + nb)
    layout = torch.rand(nb, nb, generator=g) < 0.3
    layout[torch.arange(nb), torch.randint(nb, (nb,), generator=g)] = True
    return layout


def make(layout: str, block: int, length: int, **fields) -> SparseAttention:
    """A module of ``layout``; custom layouts are drawn for the number of blocks of ``length``."""
    if layout == "custom":
        layout = _custom_layout(math.ceil(length / block))
        return SparseAttention.from_layout(layout, block_size=block, **fields)
    return SparseAttention(SparseConfig(layout=layout, block_size=block, **fields))


def inputs(b: int, h: int, length: int, e: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, length, e)
    return [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def check_against_reference(attn, q, k, v, *, attn_mask=None, key_mask=None, is_causal=False):
    """Forward and all three input gradients equal the dense float64 reference to <= 1e-10."""
    out = attn(q, k, v, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal)
    masks = check_inputs("sparse", attn.capabilities, q, k, v, attn_mask, key_mask, is_causal)
    ref, _ = sparse_reference(q, k, v, masks, attn.pattern_mask(q.shape[2], q.shape[1]), attn.scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"grad of {name}")
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("length", [1, 63, 64, 65])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference_small(layout, block, length, is_causal):
    attn = make(layout, block, length)
    check_against_reference(attn, *inputs(2, 3, length), is_causal=is_causal)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference_1000_with_key_mask(layout, block, is_causal):
    length = 1000
    attn = make(layout, block, length)
    q, k, v = inputs(1, 2, length, seed=1)
    key_mask = torch.rand(1, length, generator=torch.Generator().manual_seed(2)) < 0.8
    check_against_reference(attn, q, k, v, key_mask=key_mask, is_causal=is_causal)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [1, 63, 65])
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_mask_small(layout, length, is_causal):
    attn = make(layout, 16, length)
    q, k, v = inputs(2, 2, length, seed=3)
    key_mask = torch.rand(2, length, generator=torch.Generator().manual_seed(4)) < 0.6
    key_mask[1] = False  # a batch entry with no real key: every row of it gives 0
    out = check_against_reference(attn, q, k, v, key_mask=key_mask, is_causal=is_causal)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("layout", ["bigbird", "custom"])
@pytest.mark.parametrize("shape", [(2, 3, 70, 70), (1, 3, 70, 70), (2, 1, 1, 70), (70, 70), (2, 3, 70, 1)])
def test_bool_attn_mask_broadcast_shapes(layout, shape):
    attn = make(layout, 16, 70)
    q, k, v = inputs(2, 3, 70, seed=5)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(6)) < 0.7
    check_against_reference(attn, q, k, v, attn_mask=mask)
    check_against_reference(attn, q, k, v, attn_mask=mask, is_causal=True)


def test_float_attn_mask_with_key_mask():
    attn = make("bigbird", 16, 90)
    q, k, v = inputs(2, 3, 90, seed=7)
    g = torch.Generator().manual_seed(8)
    bias = torch.randn(2, 1, 90, 90, generator=g, dtype=torch.float64)
    bias[torch.rand(bias.shape, generator=g) < 0.2] = float("-inf")
    bias[0, 0, 5] = float("-inf")  # a fully masked row
    key_mask = torch.rand(2, 90, generator=g) < 0.9
    out = check_against_reference(attn, q, k, v, attn_mask=bias, key_mask=key_mask, is_causal=True)
    assert (out[0, :, 5] == 0).all()


def test_rows_without_keys_give_zero_and_finite_grads():
    # Query block 0 only attends to block 1: under is_causal it has nothing to attend.
    layout = torch.tensor([[False, True], [True, True]])
    attn = SparseAttention.from_layout(layout, block_size=4)
    q, k, v = inputs(1, 2, 8, seed=9)
    out = check_against_reference(attn, q, k, v, is_causal=True)
    assert (out[:, :, :4] == 0).all()
    assert (out[:, :, 4:] != 0).all()


def test_forward_equals_weights_at_value_and_rows_normalised():
    attn = attnreg.build("bigbird", block_size=8)
    q, k, v = inputs(2, 4, 77, seed=10)
    w = attn.attention_weights(q, k, is_causal=True)
    torch.testing.assert_close(attn(q, k, v, is_causal=True), w @ v, atol=1e-12, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 77, dtype=torch.float64))
    assert not w[:, :, 0, 1:].any()  # causal: token 0 sees only itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_close_to_float64(dtype):
    attn = attnreg.build("bigbird", block_size=16)
    q, k, v = (t.detach() for t in inputs(2, 2, 100, seed=11))
    want = attn(q, k, v, is_causal=True)
    got = attn(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_dropout_only_in_train_mode_and_seeded():
    attn = attnreg.build("bigbird", block_size=16, dropout=0.5)
    q, k, v = (t.detach().float() for t in inputs(1, 2, 64, seed=12))
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), attnreg.build("bigbird", block_size=16)(q, k, v))
    attn.train()
    torch.manual_seed(0)
    a = attn(q, k, v)
    torch.manual_seed(0)
    b = attn(q, k, v)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attn.eval()(q, k, v))


def test_registry_names_and_defaults():
    assert attnreg.build("sparse").config.layout == "fixed"
    assert attnreg.build("block_sparse").config.variant == "sparse"
    big = attnreg.build("bigbird")
    assert big.config.layout == "bigbird" and big.variant == "bigbird"
    again = attnreg.build(big.config.model_dump())
    assert again.config == big.config


def test_num_heads_field_is_checked():
    attn = attnreg.build("bigbird", block_size=16, num_heads=3)
    q, k, v = inputs(1, 2, 40)
    with pytest.raises(ValueError, match="num_heads=3"):
        attn(q, k, v)
    assert attn.pattern_mask(40).shape == (3, 40, 40)


def test_cross_attention_and_per_head_pattern_need_explicit_heads():
    attn = attnreg.build("bigbird", block_size=16)
    with pytest.raises(ValueError, match="num_heads"):
        attn.pattern_mask(100)
    assert attnreg.build("sparse", layout="strided").pattern_mask(100).shape == (1, 100, 100)
    q = torch.randn(1, 2, 10, 8)
    kv = torch.randn(1, 2, 12, 8)
    with pytest.raises(attnreg.UnsupportedFeatureError):
        attn(q, kv, kv)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_flops_counts_allowed_pairs(layout, is_causal):
    length, heads = 150, 3
    attn = make(layout, 16, length)
    pattern = attn.pattern_mask(length, heads).expand(heads, length, length)
    if is_causal:
        pattern = pattern & torch.ones(length, length, dtype=torch.bool).tril()
    want = 2 * (8 + 4) * int(pattern.sum()) * 2
    assert attn.flops(2, heads, length, length, 8, 4, is_causal) == want


def test_benchmark_baseline_equals_forward():
    attn = attnreg.build("bigbird", block_size=16)
    q, k, v = (t.detach() for t in inputs(2, 3, 100, seed=13))
    base = attn.benchmark_baselines()["sdpa_dense_pattern"]
    for causal in (False, True):
        torch.testing.assert_close(base(q, k, v, causal), attn(q, k, v, is_causal=causal), atol=1e-12, rtol=0)


def test_plan_is_cached_per_length():
    attn = attnreg.build("bigbird", block_size=16)
    q, k, v = (t.detach() for t in inputs(1, 2, 100))
    attn(q, k, v)
    plan = attn._plans[(100, 2, False, "cpu")]
    layout = attn.layout(100, 2)
    attn(q, k, v)
    assert attn._plans[(100, 2, False, "cpu")] is plan
    assert attn.layout(100, 2) is layout


def _reference(attn, q, k, v, **kw):
    masks = check_inputs("sparse", attn.capabilities, q, k, v, kw.get("attn_mask"), kw.get("key_mask"),
                         kw.get("is_causal", False))
    return sparse_reference(q, k, v, masks, attn.pattern_mask(q.shape[2], q.shape[1]), attn.scale)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_path_reuses_scratch_correctly(layout):
    # Without autograd the gathers go to reused buffers: lengths that shrink and grow must not mix.
    attn = make(layout, 16, 100)
    for length in (100, 37, 100):
        if layout == "custom":
            attn = make(layout, 16, length)
        q, k, v = (t.detach() for t in inputs(2, 3, length, seed=length))
        key_mask = torch.rand(2, length, generator=torch.Generator().manual_seed(length)) < 0.7
        with torch.no_grad():
            out = attn(q, k, v, key_mask=key_mask, is_causal=length == 37)
        want = _reference(attn, q, k, v, key_mask=key_mask, is_causal=length == 37)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_scratch_is_owned_by_the_module_and_freed_with_it():
    import copy
    import gc
    import pickle
    import weakref

    from attnreg.plugins.sparse import release_scratch

    attn = attnreg.build("bigbird", block_size=16)
    q, k, v = (t.detach() for t in inputs(1, 2, 200))
    with torch.no_grad():
        first = attn(q, k, v)
    assert attn._scratch.nbytes > 0, "inference must use the module's scratch buffers"
    assert not any("scratch" in name for name in attn.state_dict())
    other = attnreg.build("bigbird", block_size=16)
    assert other._scratch.nbytes == 0, "modules must not share scratch"
    for clone in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert clone._scratch.nbytes == 0 and clone._scratch is not attn._scratch
    release_scratch(torch.nn.Sequential(attn))  # frees the buffers of the sparse modules inside
    assert attn._scratch.nbytes == 0
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v), first, atol=0, rtol=0)
    buf = weakref.ref(next(iter(attn._scratch._buffers.values())))
    del attn
    gc.collect()
    assert buf() is None, "the scratch buffers must be freed with their module"


def test_concurrent_inference_on_one_module_is_correct():
    import threading

    attn = attnreg.build("bigbird", block_size=16)
    cases = [(t.detach() for t in inputs(1, 2, length, seed=length)) for length in (200, 130, 200, 70)]
    cases = [tuple(c) for c in cases]
    with torch.no_grad():
        want = [attn(*c) for c in cases]
    got: dict[int, list[torch.Tensor]] = {}
    barrier = threading.Barrier(len(cases))

    def work(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            got[i] = [attn(*cases[i]) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        assert len(got[i]) == 5
        for out in got[i]:
            torch.testing.assert_close(out, w, atol=0, rtol=0)


def test_many_groups_with_attn_mask():
    attn = make("strided", 16, 300)  # many distinct active-block counts -> many groups
    q, k, v = inputs(2, 2, 300, seed=14)
    mask = torch.rand(2, 1, 300, 300, generator=torch.Generator().manual_seed(15)) < 0.8
    check_against_reference(attn, q, k, v, attn_mask=mask, is_causal=True)
    check_against_reference(attn, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shape", [(2, 1, 40, 40), (1, 3, 40, 40), (2, 1, 1, 40), (40, 1)])
def test_full_rows_differing_per_head_with_attn_mask(shape):
    # Each head has one query block that sees every block, a different one per head.
    layout = torch.eye(3, dtype=torch.bool).repeat(3, 1, 1)  # (3, 3, 3)
    for h in range(3):
        layout[h, h] = True
    attn = SparseAttention.from_layout(layout, block_size=14)
    q, k, v = inputs(2, 3, 40, seed=16)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(17)) < 0.6
    check_against_reference(attn, q, k, v, attn_mask=mask)
    check_against_reference(attn, q, k, v, attn_mask=mask.double().log(), key_mask=torch.rand(2, 40) < 0.8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stream_bytes", [1, 200_000])  # one row per SDPA call; a few rows, uneven
@pytest.mark.parametrize("is_causal", [False, True])
def test_inference_streams_rows_in_chunks(monkeypatch, layout, stream_bytes, is_causal):
    """Without autograd each group is gathered and attended a few rows at a time; every mask form
    must follow its rows (per-row masks sliced, shared ones broadcast)."""
    import attnreg.plugins.sparse.execute as sparse_execute

    monkeypatch.setattr(sparse_execute, "_STREAM_BYTES", stream_bytes)
    attn = make(layout, 16, 150)  # partial last block (150 = 9 * 16 + 6)
    q, k, v = (t.detach() for t in inputs(2, 2, 150, seed=21))
    g = torch.Generator().manual_seed(22)
    key_mask = torch.rand(2, 150, generator=g) < 0.8
    bool_mask = torch.rand(2, 2, 150, 150, generator=g) < 0.7
    float_mask = torch.randn(1, 2, 150, 150, generator=g, dtype=torch.float64)
    for kw in ({}, {"key_mask": key_mask}, {"attn_mask": bool_mask, "key_mask": key_mask},
               {"attn_mask": float_mask}):
        with torch.no_grad():
            out = attn(q, k, v, is_causal=is_causal, **kw)
        want = _reference(attn, q, k, v, is_causal=is_causal, **kw)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_inference_scratch_is_bounded_by_the_stream_size():
    attn = attnreg.build("bigbird")  # block 64: 8 key blocks per row
    q, k, v = (torch.randn(1, 4, 4096, 64) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v)
    # all rows at once would gather ~ 4 heads * 62 rows * 8 blocks * 64 * 64 * 2 * 4 B = 65 MB
    assert 0 < attn._scratch.nbytes <= 12 << 20


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [1, 5])
def test_a_sequence_shorter_than_a_block_is_not_padded_to_it(monkeypatch, layout, length):
    """With L <= block_size the layout is one block whatever its size: the call runs on L tokens.
    It used to pad queries and keys to the whole block (block_size=4096, L=5: about 11 s per
    forward + backward pair instead of milliseconds; found by tests/test_properties.py)."""
    import attnreg.plugins.sparse.execute as execute

    key_lengths = []
    sdpa = execute.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        key_lengths.append(k.shape[-2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(execute.F, "scaled_dot_product_attention", spy)
    attn = make(layout, 4096, length, **({"num_heads": 3} if layout == "bigbird" else {}))
    q, k, v = inputs(2, 3, length)
    km = torch.tensor([[True] * length, [True] + [False] * (length - 1)])
    for is_causal in (False, True):
        check_against_reference(attn, q, k, v, key_mask=km, is_causal=is_causal)
    check_against_reference(attn, q, k, v, attn_mask=torch.randn(length, length, dtype=torch.float64))
    if length > 1:
        lower_right = attn(q[:, :, 1:], k, v, is_causal=True, causal_alignment="lower_right")
        torch.testing.assert_close(lower_right, attn(q, k, v, is_causal=True)[:, :, 1:], atol=1e-12, rtol=0)
    assert key_lengths and max(key_lengths) <= length, key_lengths
