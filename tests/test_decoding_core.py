"""The core decoding contract: the default KV-cache state, its buffers, reordering and errors;
lower-right causal alignment in the mask helpers. Per-variant decoding is tested in the
variants' own tests and, generically, by the conformance suite."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import Capabilities, KVCacheState, UnsupportedFeatureError, causal_mask, check_inputs

B, H, E = 3, 2, 4


def _qkv(length: int, seed: int = 0, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, E, generator=g, dtype=torch.float64).requires_grad_(grad)
            for _ in range(3)]


def test_causal_mask_offset_is_lower_right_alignment() -> None:
    m = causal_mask(2, 5, offset=3)
    assert m.tolist() == [[True] * 4 + [False], [True] * 5]
    assert torch.equal(causal_mask(4, 4, offset=0), torch.ones(4, 4, dtype=torch.bool).tril())


def test_lower_right_is_rejected_or_accepted_by_capabilities() -> None:
    q, k, v = _qkv(6)
    plain = Capabilities(causal=True)  # no cross attention, no decoding
    with pytest.raises(UnsupportedFeatureError, match="lower_right"):
        check_inputs("toy", plain, q[:, :, :2], k, v, None, None, True, "lower_right")
    with pytest.raises(UnsupportedFeatureError, match="causal_alignment='lower_right', or use attn.decode"):
        check_inputs("toy", plain, q[:, :, :2], k, v, None, None, True)
    dec = Capabilities(causal=True, decoding=True)
    assert check_inputs("toy", dec, q[:, :, :2], k, v, None, None, True, "lower_right").q_offset == 4
    assert check_inputs("toy", dec, q, k, v, None, None, True, "lower_right").q_offset == 0
    with pytest.raises(ValueError, match="query length must be <= key length"):
        check_inputs("toy", dec, q, k[:, :, :3], v[:, :, :3], None, None, True, "lower_right")
    with pytest.raises(ValueError, match="needs is_causal=True"):
        check_inputs("toy", dec, q, k, v, None, None, False, "lower_right")
    with pytest.raises(ValueError, match="causal_alignment must be one of"):
        check_inputs("toy", dec, q, k, v, None, None, True, "bottom")
    with pytest.raises(ValueError, match="decoding=True requires causal=True"):
        Capabilities(decoding=True)


def test_kv_cache_writes_in_place_and_grows_by_doubling() -> None:
    attn = attnreg.build("dot_product")
    q, k, v = _qkv(40)
    state = attn.init_state(B, H, E, dtype=torch.float64)
    _, state = attn.decode(q[:, :, :3], k[:, :, :3], v[:, :, :3], state)
    assert isinstance(state, KVCacheState) and state.capacity == 16 and state.key_mask is None
    buf = state.key_buffer
    _, state = attn.decode(q[:, :, 3:4], k[:, :, 3:4], v[:, :, 3:4], state)
    assert state.key_buffer is buf  # room left: no copy of the cache
    _, state = attn.decode(q[:, :, 4:20], k[:, :, 4:20], v[:, :, 4:20], state)
    assert state.capacity == 32 and state.length == 20 and torch.equal(state.key, k[:, :, :20])
    bounded = attn.init_state(B, H, E, dtype=torch.float64, max_length=40)
    _, bounded = attn.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], bounded)
    assert bounded.capacity == 40  # max_length known: allocated once
    assert bounded.nbytes == 2 * B * H * 40 * E * 8


def test_kv_cache_matches_forward_with_padding_and_under_autograd() -> None:
    attn = attnreg.build("dot_product").double()
    km = torch.ones(B, 21, dtype=torch.bool)
    km[1, :4] = False
    km[2, :21] = False  # a row with nothing real: output 0
    q, k, v = _qkv(21, grad=True)
    want = attn(q, k, v, key_mask=km, is_causal=True)
    want.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    state, outs = attn.init_state(B, H, E, dtype=torch.float64), []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 21)):
        out, state = attn.decode(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state, key_mask=km[:, lo:hi])
        outs.append(out)
    got = torch.cat(outs, dim=2)  # (B, H, L, Ev)
    assert (got - want).abs().max() <= 1e-12 and torch.all(got[2] == 0)
    got.sum().backward()  # the cache concatenates under autograd: nothing saved is overwritten
    for t, g in zip((q, k, v), grads, strict=True):
        assert (t.grad - g).abs().max() <= 1e-12


def test_state_reorder_device_and_errors() -> None:
    attn = attnreg.build("dot_product")
    q, k, v = _qkv(8)
    state = attn.init_state(B, H, E, dtype=torch.float64, max_length=10)
    _, state = attn.decode(q[:, :, :6], k[:, :, :6], v[:, :, :6], state)
    beams = state.index_select(torch.tensor([2, 2, 0, 1]))
    assert beams.batch == 4 and torch.equal(beams.key[0], state.key[2])
    assert torch.equal(beams.key[3], state.key[1])
    assert beams.key_buffer.data_ptr() != state.key_buffer.data_ptr()  # a copy: both can go on
    assert state.to("cpu").length == 6
    with pytest.raises(ValueError, match="outside"):
        state.index_select(torch.tensor([3]))
    with pytest.raises(ValueError, match="1-D integer"):
        state.index_select(torch.tensor([[0]]))
    with pytest.raises(ValueError, match="exceed the state's max_length 10"):
        attn.decode(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
    with pytest.raises(ValueError, match="do not match the state"):
        attn.decode(q[:, :1, :1], k[:, :1, :1], v[:, :1, :1], state)
    with pytest.raises(ValueError, match="float32"):
        attn.decode(*(t[:, :, :1].float() for t in (q, k, v)), state)
    with pytest.raises(ValueError, match="integer >= 1"):
        attn.init_state(0, H, E)
    with pytest.raises(ValueError, match="key_mask"):
        attn.decode(q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7], state,
                    key_mask=torch.ones(B, 2, dtype=torch.bool))


@pytest.mark.parametrize("name", ["dot_product", "local", "linear", "sparse"])
def test_states_store_the_device_their_tensors_report(name: str) -> None:
    """'cpu:0' (like 'cuda' for cuda:0) names the device tensors report as 'cpu': a state made
    or moved with it must still accept those tensors."""
    attn = attnreg.build(name, **({"block_size": 2} if name == "sparse" else {}))
    q, k, v = _qkv(3)
    for state in (attn.init_state(B, H, E, dtype=torch.float64, device="cpu:0", max_length=8),
                  attn.init_state(B, H, E, dtype=torch.float64, max_length=8).to("cpu:0")):
        assert state.device == torch.device("cpu") == q.device
        out, state = attn.decode(q, k, v, state)
        out, state = attn.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state.to(torch.device("cpu", 0)))
        assert out.shape == (B, H, 1, E) and state.length == 4


def test_init_state_rejects_bool_sizes() -> None:
    attn = attnreg.build("dot_product")
    with pytest.raises(ValueError, match="max_length must be None or an integer >= 1, got True"):
        attn.init_state(1, 1, 4, max_length=True)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got True"):
        attn.init_state(True, 1, 4)


def _decode_in_two_calls(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         split: int) -> torch.Tensor:
    state = attn.init_state(q.shape[0], k.shape[1], q.shape[-1], v.shape[-1], dtype=q.dtype)
    first, state = attn.decode(q[:, :, :split], k[:, :, :split], v[:, :, :split], state)
    second, _ = attn.decode(q[:, :, split:], k[:, :, split:], v[:, :, split:], state)
    return torch.cat([first, second], dim=2)  # (B, H, L, Ev)


def test_kv_cache_backward_when_only_the_query_requires_grad() -> None:
    """The first call saves a view of the cache for backward (q @ K^T with q requiring grad):
    the second call must not write into it in place."""
    attn = attnreg.build("dot_product")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    _decode_in_two_calls(attn, q, k, v, 3).sum().backward()
    got = q.grad.clone()
    q.grad = None
    attn(q, k, v, is_causal=True).sum().backward()
    assert (got - q.grad).abs().max() <= 1e-12


def test_kv_cache_backward_through_trainable_parameters() -> None:
    """additive: plain inputs, trainable parameters: every call records a graph."""
    attn = attnreg.build("additive", num_heads=1, head_dim=4).double()
    q, k, v = (t[:1, :1] for t in _qkv(6, seed=4))
    _decode_in_two_calls(attn, q, k, v, 4).sum().backward()
    got = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    attn(q, k, v, is_causal=True).sum().backward()
    for a, b in zip(got, (p.grad for p in attn.parameters()), strict=True):
        assert (a - b).abs().max() <= 1e-12


def test_kv_cache_writes_in_place_whenever_no_graph_is_recorded() -> None:
    attn = attnreg.build("dot_product")
    q, k, v = _qkv(6)
    leaf = q.clone().requires_grad_(True)
    for ctx, query in ((torch.enable_grad(), q), (torch.no_grad(), leaf), (torch.inference_mode(), leaf)):
        with ctx:
            state = attn.init_state(B, H, E, dtype=torch.float64, max_length=6)
            _, state = attn.decode(query[:, :, :3], k[:, :, :3], v[:, :, :3], state)
            buf = state.key_buffer
            _, state = attn.decode(query[:, :, 3:], k[:, :, 3:], v[:, :, 3:], state)
            assert state.key_buffer is buf and torch.equal(state.key, k)
    with torch.enable_grad():  # the cache itself requires grad (an earlier call with keys that did)
        state = attn.init_state(B, H, E, dtype=torch.float64, max_length=6)
        _, state = attn.decode(q[:, :, :3], k[:, :, :3].requires_grad_(True), v[:, :, :3], state)
        assert state.key.requires_grad and attn.records_graph(*state.tensors().values())
        buf = state.key_buffer
        _, state = attn.decode(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], state)
        assert state.key_buffer is not buf


def test_kv_cache_append_in_place_flag() -> None:
    _, k, v = _qkv(4)
    empty = KVCacheState(B, H, E, E, torch.float64, torch.device("cpu"), max_length=4)
    state = empty.append(k[:, :, :2], v[:, :, :2], None, in_place=True)
    buf = state.key_buffer
    assert state.append(k[:, :, 2:], v[:, :, 2:], None, in_place=True).key_buffer is buf
    grown = state.append(k[:, :, 2:], v[:, :, 2:], None, in_place=False)
    assert grown.key_buffer is not buf and torch.equal(grown.key, k)
    with torch.enable_grad():  # default: in place only when grad mode is off
        assert state.append(k[:, :, 2:], v[:, :, 2:], None).key_buffer is not buf
    with torch.no_grad():
        assert state.append(k[:, :, 2:], v[:, :, 2:], None).key_buffer is buf


def test_key_mask_helpers() -> None:
    from attnreg.core import join_key_masks, write_key_mask

    assert join_key_masks(None, None, 3, 2) is None  # no mask given yet: every position real
    new = torch.tensor([[False, True], [True, True]])
    assert join_key_masks(None, new, 1, 2).tolist() == [[True, False, True], [True, True, True]]
    assert join_key_masks(new, None, 2, 1).tolist() == [[False, True, True], [True, True, True]]
    assert write_key_mask(None, None, 0, 2, 4) is None
    buf = write_key_mask(None, new, 1, 3, 4)
    assert buf.tolist() == [[True, False, True, True], [True, True, True, True]]
    buf[:, 3] = False  # a stale entry past the length (a state decoded twice)
    assert write_key_mask(buf, None, 3, 4, 4) is buf and bool(buf[:, 3].all())


def test_unusable_devices_raise_value_error() -> None:
    attn = attnreg.build("dot_product")
    with pytest.raises(ValueError, match="device 'foo' is not usable"):
        attn.init_state(1, 1, 4, device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not usable"):
            attn.init_state(1, 1, 4, device="cuda")
