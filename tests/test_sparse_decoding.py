"""sparse / bigbird: lower-right causal calls and incremental decoding against the float64 reference.

The layout depends on the total length L, so "the causal full forward over the whole sequence"
is the forward at L, and a decoding state is created with ``max_length=L``.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.sparse import SparseAttention, SparseConfig, sparse_reference

LAYOUTS = ["bigbird", "strided", "fixed", "custom"]
E, EV = 4, 5  # head_dim != value_dim

pytestmark = pytest.mark.usefixtures("one_thread")


def custom_layout(nb: int, heads: int = 2, seed: int = 0) -> torch.Tensor:
    """A random per-head layout (H, nb, nb); row 0 only looks ahead (no key block under causal)."""
    g = torch.Generator().manual_seed(seed + nb)
    layout = torch.rand(heads, nb, nb, generator=g) < 0.35
    layout[:, torch.arange(nb), torch.randint(nb, (nb,), generator=g)] = True
    layout[:, 0] = False
    layout[:, 0, nb - 1] = True
    return layout


def make(layout: str, block: int, length: int, **fields) -> SparseAttention:
    """Small-block modules whose layouts have every kind of block at short lengths."""
    if layout == "custom":
        return SparseAttention.from_layout(custom_layout(math.ceil(length / block)), block_size=block,
                                           **fields)
    if layout == "bigbird":
        fields = {"num_global_blocks": 1, "num_random_blocks": 2, **fields}
    return SparseAttention(SparseConfig(layout=layout, block_size=block, **fields))


def inputs(b: int, length: int, heads: int = 2, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, length, d, generator=g, dtype=torch.float64, requires_grad=grad)
            for d in (E, E, EV)]


def left_padding(b: int, length: int, pads: tuple[int, ...] = (0, 3, 9)) -> torch.Tensor:
    """key_mask (B, L): row i starts with pads[i] padding positions (batched generation)."""
    return torch.arange(length)[None, :] >= torch.tensor(pads[:b])[:, None]


def reference(attn, q, k, v, *, attn_mask=None, key_mask=None):
    """Float64 dense softmax over the rows of the length-Lk pattern that the last Lq queries own."""
    masks = check_inputs("sparse", attn.capabilities, q, k, v, attn_mask, key_mask, True, "lower_right")
    lk = k.shape[2]
    pattern = attn.pattern_mask(lk, is_causal=False, num_heads=q.shape[1])  # (H, Lk, Lk)
    pattern = pattern[:, lk - q.shape[2] :]  # (H, Lq, Lk)
    return sparse_reference(q, k, v, masks, pattern, attn.scale)[0]


def assert_close(got, want, msg=""):
    assert torch.isfinite(got).all(), msg
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=msg)


# ----------------------------------------------------------------- lower-right forward / backward
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [3, 4])
@pytest.mark.parametrize("lq", [1, 2, 5, 13])  # within one block, across blocks, partial at both ends
def test_lower_right_forward_and_grads_match_reference(layout, block, lq):
    lk = 23  # not a multiple of 3 or 4
    attn = make(layout, block, lk)
    q, k, v = inputs(3, lk, seed=lq, grad=True)
    q = q[:, :, lk - lq :].detach().requires_grad_()
    g = torch.Generator().manual_seed(block)
    key_mask = left_padding(3, lk) & (torch.rand(3, lk, generator=g) < 0.85)
    bool_mask = torch.rand(3, 1, lq, lk, generator=g) < 0.8
    float_mask = torch.randn(1, 2, lq, lk, generator=g, dtype=torch.float64)
    float_mask[torch.rand(float_mask.shape, generator=g) < 0.15] = float("-inf")
    for kw in ({}, {"key_mask": key_mask}, {"attn_mask": bool_mask, "key_mask": key_mask},
               {"attn_mask": float_mask}):
        out = attn(q, k, v, is_causal=True, causal_alignment="lower_right", **kw)
        want = reference(attn, q, k, v, **kw)
        assert out.shape == (3, 2, lq, EV)
        assert_close(out, want, f"forward {sorted(kw)}")
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        ref = torch.autograd.grad(want, (q, k, v), grad_out)
        for name, a, b in zip("qkv", got, ref, strict=True):
            assert_close(a, b, f"grad of {name} {sorted(kw)}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lower_right_weights_and_inference_path(layout):
    lk, lq = 26, 9
    attn = make(layout, 4, lk)
    q, k, v = inputs(2, lk, seed=5)
    q = q[:, :, lk - lq :]
    key_mask = left_padding(2, lk)
    w = attn.attention_weights(q, k, key_mask=key_mask, is_causal=True, causal_alignment="lower_right")
    with torch.no_grad():  # the streamed path with reused scratch buffers
        out = attn(q, k, v, key_mask=key_mask, is_causal=True, causal_alignment="lower_right")
    assert_close(out, w @ v)
    assert_close(out, reference(attn, q, k, v, key_mask=key_mask))
    assert not w[..., :, lk - lq + 1 :].triu().any()  # query i never sees a key after i + offset


def test_lower_right_equals_the_last_rows_of_the_full_causal_forward():
    attn = attnreg.build("bigbird", block_size=16)  # defaults: window 3, global 2, random 3
    q, k, v = inputs(1, 200, heads=3, seed=6)
    full = attn(q, k, v, is_causal=True)
    for lq in (1, 17, 100):
        part = attn(q[:, :, -lq:], k, v, is_causal=True, causal_alignment="lower_right")
        assert_close(part, full[:, :, -lq:], f"lq={lq}")


# ----------------------------------------------------------------- decoding
def decode_in_steps(attn, q, k, v, key_mask, chunks, state):
    """Decode q/k/v (B, H, L, D) in ``chunks`` (lengths summing to L); key_mask only where padded."""
    outs, pos, start = [], 0, state.length
    for t in chunks:
        sl = slice(pos, pos + t)
        km = None if key_mask is None or bool(key_mask[:, sl].all()) else key_mask[:, sl]
        out, state = attn.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, key_mask=km)
        assert out.shape == (q.shape[0], q.shape[1], t, v.shape[-1])
        outs.append(out)
        pos += t
    assert pos == q.shape[2] and state.length == start + pos
    return torch.cat(outs, dim=2), state


def steps(length: int, seed: int) -> list[int]:
    """A random prefill, single tokens, one multi-token chunk, single tokens to the end."""
    prefix = int(torch.randint(1, length // 2, (1,), generator=torch.Generator().manual_seed(seed)))
    rest = length - prefix - 7
    return [prefix] + [1] * (rest // 2) + [7] + [1] * (rest - rest // 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [3, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_equals_causal_forward_over_the_whole_sequence(layout, block, padded):
    length = 29
    attn = make(layout, block, length)
    q, k, v = inputs(3, length, seed=block)
    key_mask = left_padding(3, length) if padded else None
    state = attn.init_state(3, 2, E, EV, dtype=torch.float64, max_length=length)
    got, state = decode_in_steps(attn, q, k, v, key_mask, steps(length, block + padded), state)
    want = attn(q, k, v, key_mask=key_mask, is_causal=True)
    assert_close(got, want)
    assert_close(got, reference(attn, q, k, v, key_mask=key_mask))
    if padded:
        assert (got[2, :, :9] == 0).all()  # padded positions with nothing real before them


@pytest.mark.parametrize("name, fields", [
    ("sparse", {"layout": "strided", "stride": 3}),
    ("sparse", {"layout": "fixed", "stride": 3, "c": 2}),
    ("bigbird", {"num_random_blocks": 0, "num_global_blocks": 1}),
    ("custom", {}),
])
def test_layouts_independent_of_the_length_decode_without_max_length(name, fields):
    length = 31
    attn = make(name, 3, length) if name == "custom" else attnreg.build(name, block_size=3, **fields)
    assert attn.max_length_reason() is None
    q, k, v = inputs(2, length, seed=7)
    key_mask = left_padding(2, length)
    state = attn.init_state(2, 2, E, EV, dtype=torch.float64)
    assert state.max_length == (33 if name == "custom" else None)  # custom: all its 11 blocks cover
    got, state = decode_in_steps(attn, q, k, v, key_mask, steps(length, 3), state)
    assert_close(got, attn(q, k, v, key_mask=key_mask, is_causal=True))
    # custom: its 11 blocks at once; otherwise grown to a power of two of blocks (16 >= 31 / 3)
    assert state.capacity == (33 if name == "custom" else 16 * 3)


@pytest.mark.parametrize("name, fields, why", [
    ("bigbird", {}, "random blocks"),
    ("sparse", {}, "stride defaults"),  # layout 'fixed'
    ("sparse", {"layout": "strided"}, "stride defaults"),
])
def test_missing_max_length_raises_a_clear_error(name, fields, why):
    attn = attnreg.build(name, block_size=4, **fields)
    with pytest.raises(ValueError, match=rf"needs max_length.*{why}.*init_state\(\.\.\., max_length=L\)"):
        attn.init_state(1, 2, E)
    attn.init_state(1, 2, E, max_length=50)  # fine with it


def test_custom_layout_max_length_must_fit_and_decode_beyond_it_is_rejected():
    attn = SparseAttention.from_layout(custom_layout(4), block_size=4)  # lengths 13..16
    for bad in (12, 20):
        with pytest.raises(ValueError, match=rf"max_length={bad} does not fit.*lengths 13\.\.16"):
            attn.init_state(1, 2, E, max_length=bad)
    with pytest.raises(ValueError, match="2 heads but the input has 3"):
        attn.init_state(1, 3, E, max_length=16)
    state = attn.init_state(1, 2, E, EV, dtype=torch.float64, max_length=14)
    q, k, v = inputs(1, 15)
    _, state = attn.decode(q[:, :, :14], k[:, :, :14], v[:, :, :14], state)
    with pytest.raises(ValueError, match="max_length 14"):
        attn.decode(q[:, :, 14:], k[:, :, 14:], v[:, :, 14:], state)


def test_decode_rejects_a_foreign_state():
    attn = attnreg.build("bigbird", block_size=4)
    x = torch.randn(1, 2, 1, E, dtype=torch.float64)
    other_block = attnreg.build("bigbird", block_size=8).init_state(1, 2, E, dtype=torch.float64,
                                                                     max_length=40)
    kv_cache = attnreg.build("dot_product").init_state(1, 2, E, dtype=torch.float64)
    for state in (other_block, kv_cache):
        with pytest.raises(ValueError, match="state of its own init_state"):
            attn.decode(x, x, x, state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reordered_state_equals_decoding_the_reordered_batch(layout):
    length, prefix = 26, 11
    attn = make(layout, 4, length)
    q, k, v = inputs(3, length, seed=8)
    key_mask = left_padding(3, length)
    index = torch.tensor([2, 0, 2])  # beam search: rows repeat
    state = attn.init_state(3, 2, E, EV, dtype=torch.float64, max_length=length)
    _, state = decode_in_steps(attn, *(t[:, :, :prefix] for t in (q, k, v)), key_mask[:, :prefix],
                               [prefix], state)
    branch = state.index_select(index)
    assert branch.batch == 3 and branch.key is not state.key
    rest = [length - prefix - 5, 5]
    qi, ki, vi, kmi = q[index], k[index], v[index], key_mask[index]
    got, _ = decode_in_steps(attn, *(t[:, :, prefix:] for t in (qi, ki, vi)), kmi[:, prefix:], rest, branch)
    fresh = attn.init_state(3, 2, E, EV, dtype=torch.float64, max_length=length)
    want, _ = decode_in_steps(attn, qi, ki, vi, kmi, [prefix] + rest, fresh)
    assert_close(got, want[:, :, prefix:])
    # The original state was copied, not moved: it still decodes its own batch.
    mine, _ = decode_in_steps(attn, *(t[:, :, prefix:] for t in (q, k, v)), key_mask[:, prefix:], rest, state)
    assert_close(mine, attn(q, k, v, key_mask=key_mask, is_causal=True)[:, :, prefix:])


@pytest.mark.parametrize("layout", ["bigbird", "custom"])
def test_gradients_through_decoding_equal_the_forward(layout):
    length = 21
    attn = make(layout, 4, length)
    q, k, v = inputs(2, length, seed=9, grad=True)
    key_mask = left_padding(2, length, (0, 5))
    state = attn.init_state(2, 2, E, EV, dtype=torch.float64, max_length=length)
    got, _ = decode_in_steps(attn, q, k, v, key_mask, [9, 1, 1, 6, 1, 1, 1, 1], state)
    want = attn(q, k, v, key_mask=key_mask, is_causal=True)
    grad_out = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad_out),
                          torch.autograd.grad(want, (q, k, v), grad_out), strict=True):
        assert_close(a, b, f"grad of {name}")


@pytest.mark.parametrize("max_length", [500, 2000])
def test_a_decoded_token_reads_only_its_active_blocks(monkeypatch, max_length):
    """Per token: one query row per head against (active blocks of its row) * block keys,
    whatever the context; the state holds max_length positions from the first step on."""
    attn = attnreg.build("bigbird", block_size=16)
    b, heads = 16, 2
    calls: list[tuple[int, int]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[0] * q.shape[1] * q.shape[2], k.shape[-2]))  # (query rows, keys per row)
        return sdpa(q, k, v, **kw)

    state = attn.init_state(1, heads, E, dtype=torch.float32, max_length=max_length)
    q, k, v = (torch.randn(1, heads, max_length, E) for _ in range(3))
    with torch.no_grad():
        _, state = attn.decode(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], state)
        nbytes = state.nbytes
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out, state = attn.decode(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
    assert state.nbytes == nbytes == 2 * heads * math.ceil(max_length / b) * b * E * 4
    last = (max_length - 1) // b
    layout = attn.layout(max_length, heads)[:, last, : last + 1]  # (H, nb') causal row of the token
    assert sum(rows for rows, _ in calls) == heads  # one row per head, not a block of b rows
    assert sum(rows * keys for rows, keys in calls) == int(layout.sum()) * b
    assert int(layout.sum(-1).max()) <= 2 + 2 + 3  # causal window + global + random: not the context
    want = attn(q, k, v, is_causal=True)[:, :, -1:]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_flops_of_the_last_positions_count_their_allowed_pairs():
    attn = make("strided", 4, 50)
    lk, lq, heads = 50, 7, 2
    pattern = attn.pattern_mask(lk, is_causal=True, num_heads=heads)[:, lk - lq :]  # (H, Lq, Lk)
    got = attn.flops(3, heads, lq, lk, E, EV, is_causal=True, causal_alignment="lower_right")
    assert got == 2 * (E + EV) * int(pattern.sum()) * 3
    full = attn.pattern_mask(lk, is_causal=True, num_heads=heads)  # (H, Lk, Lk)
    assert attn.flops(3, heads, lk, lk, E, EV, is_causal=True) == 2 * (E + EV) * int(full.sum()) * 3
    for causal, alignment in ((False, "upper_left"), (True, "upper_left")):
        with pytest.raises(ValueError, match="needs is_causal"):
            attn.flops(1, heads, lq, lk, E, EV, is_causal=causal, causal_alignment=alignment)


def test_concurrent_decoding_and_forwards_on_one_module():
    """Threads share a module's layout, plan and row-table caches (LRU, 16 entries each): many
    lengths at once force evictions while other threads read."""
    attn = make("bigbird", 4, 0)
    lengths = list(range(21, 21 + 24))
    data = {n: inputs(1, n, seed=n) for n in lengths}

    def run(n):
        q, k, v = data[n]
        state = attn.init_state(1, 2, E, EV, dtype=torch.float64, max_length=n)
        dec, _ = decode_in_steps(attn, q, k, v, None, [n - 3, 1, 2], state)
        return dec, attn(q[:, :, -5:], k, v, is_causal=True, causal_alignment="lower_right"), \
            attn(q, k, v, is_causal=True)

    with torch.no_grad():
        want = {n: run(n) for n in lengths}
    got: dict[int, tuple] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(4)

    def work(part):
        barrier.wait()
        try:
            with torch.no_grad():
                for n in part:
                    got[n] = run(n)
        except Exception as err:  # reported below, with the thread's traceback
            errors.append(err)

    threads = [threading.Thread(target=work, args=(lengths[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for n in lengths:
        for a, b in zip(got[n], want[n], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert_close(got[n][0], got[n][2])  # decoding == the full causal forward
