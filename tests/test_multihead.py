"""``attnreg.MultiHeadAttention`` over every registered variant (timm style: a new plugin is
tested for free), each with its default config and its first ``check_configs`` override (small
blocks/windows, so the tiny inputs reach the variant's fast paths)."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import UnsupportedFeatureError

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, HKV, B, L = 16, 4, 2, 3, 13  # L = 13: not a multiple of any block/chunk/window in use
F64 = torch.float64
# A key bias adds q.b to every logit of a row: softmax variants give it a zero gradient.
SHIFT_INVARIANT = "k_proj.bias"


def _cases() -> list:
    out = []
    for name in attnreg.list_variants():
        spec = attnreg.get_variant(name)
        out.append(pytest.param(name, {}, id=name))
        if spec.check_configs:
            over = dict(spec.check_configs[0])
            tag = ",".join(f"{k}={v}" for k, v in over.items())
            out.append(pytest.param(name, over, id=f"{name}[{tag}]"))
    return out


CASES = _cases()


def _caps(name: str) -> attnreg.Capabilities:
    return attnreg.get_variant(name).capabilities


def _mha(name: str, over: dict, kv_heads: int | None = HKV, seed: int = 0) -> attnreg.MultiHeadAttention:
    torch.manual_seed(seed)
    return attnreg.MultiHeadAttention(D, H, kv_heads, {"variant": name, **over}, dtype=F64).eval()


def _x(length: int = L, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, length, D, generator=g, dtype=F64)  # (B, L, D)


def _left_pad(length: int = L, pads: tuple[int, ...] = (0, 2, 5)) -> torch.Tensor:
    real = torch.ones(B, length, dtype=torch.bool)  # (B, L)
    for row, p in enumerate(pads):
        real[row, :p] = False
    return real


def _manual(mha: attnreg.MultiHeadAttention, x: torch.Tensor, **masks) -> torch.Tensor:
    """The module's computation written out: H query heads, K/V repeated to H heads."""
    b, n, _ = x.shape
    e, rep = mha.head_dim, H // mha.num_kv_heads
    q = mha.q_proj(x).view(b, n, H, e).transpose(1, 2)  # (B, H, L, E)
    k = mha.k_proj(x).view(b, n, mha.num_kv_heads, e).transpose(1, 2).repeat_interleave(rep, 1)
    v = mha.v_proj(x).view(b, n, mha.num_kv_heads, e).transpose(1, 2).repeat_interleave(rep, 1)
    out = mha.attention(q, k, v, **masks)  # (B, H, L, E)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, D))  # (B, L, D)


@pytest.mark.parametrize("name,over", CASES)
def test_shapes_and_weights_compose(name: str, over: dict) -> None:
    mha, x = _mha(name, over), _x()
    out, w = mha(x, need_weights=True)
    assert out.shape == (B, L, D) and w.shape == (B, H, L, L)
    # out == out_proj(merge(weights @ V)): the weights are those of the very computation.
    v = mha.v_proj(x).view(B, L, HKV, D // H).transpose(1, 2).repeat_interleave(H // HKV, 1)
    merged = (w @ v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
    torch.testing.assert_close(out, mha.out_proj(merged), rtol=0, atol=1e-12)
    assert torch.equal(out, mha(x))


@pytest.mark.parametrize("name,over", CASES)
def test_key_mask_hides_padded_keys(name: str, over: dict) -> None:
    if not _caps(name).key_mask:
        pytest.skip(f"{name} declares key_mask=False")
    mha, x = _mha(name, over), _x()
    real = _left_pad().flip(1)  # right padding: rows 1, 2 end in 2 and 5 pad positions
    x2 = x.clone()
    x2[~real] = 100.0  # garbage at padded positions
    out, out2 = mha(x, key_mask=real), mha(x2, key_mask=real)
    torch.testing.assert_close(out[real], out2[real], rtol=0, atol=1e-12)
    assert not torch.allclose(out, mha(x))  # the mask is in force


@pytest.mark.parametrize("name,over", CASES)
def test_causal_ignores_the_future(name: str, over: dict) -> None:
    if not _caps(name).causal:
        pytest.skip(f"{name} declares causal=False")
    mha, x = _mha(name, over), _x()
    x2 = x.clone()
    x2[:, 7:] = torch.randn(B, L - 7, D, dtype=F64)
    out, out2 = mha(x, is_causal=True), mha(x2, is_causal=True)
    torch.testing.assert_close(out[:, :7], out2[:, :7], rtol=0, atol=1e-12)
    assert not torch.allclose(out[:, 7:], out2[:, 7:])


@pytest.mark.parametrize("name,over", CASES)
def test_backward_is_finite_and_reaches_every_parameter(name: str, over: dict) -> None:
    caps = _caps(name)
    mha, x = _mha(name, over), _x().requires_grad_()
    kw = {"key_mask": _left_pad()} if caps.key_mask else {}
    mha(x, is_causal=caps.causal, **kw).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in mha.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        if pname != SHIFT_INVARIANT:
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,over", CASES)
def test_every_parameter_exists_at_construction(name: str, over: dict) -> None:
    mha = _mha(name, over)
    before = {n: p for n, p in mha.named_parameters()}
    assert all(p.dtype == F64 for p in before.values())
    if _caps(name).learnable:
        assert any(n.startswith("attention.") for n in before), "a learnable variant's parameters"
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    snapshot = {n: p.detach().clone() for n, p in before.items()}
    mha(_x(), is_causal=_caps(name).causal).pow(2).sum().backward()
    opt.step()
    after = dict(mha.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    for n, p in after.items():  # the optimizer built before the first forward moved every one
        assert n == SHIFT_INVARIANT or not torch.equal(p, snapshot[n]), n


@pytest.mark.parametrize("name,over", CASES)
def test_grouped_query_equals_repeated_kv(name: str, over: dict) -> None:
    caps = _caps(name)
    mha, x = _mha(name, over), _x()
    kw = {"key_mask": _left_pad()} if caps.key_mask else {}
    kw["is_causal"] = caps.causal
    out = mha(x, **kw)
    torch.testing.assert_close(out, _manual(mha, x, **kw), rtol=0, atol=1e-12)
    # Same function as a full-head module whose K/V projections repeat each group's rows.
    full = _mha(name, over, kv_heads=None)
    rep = H // HKV
    with torch.no_grad():
        for src, dst in ((mha.k_proj, full.k_proj), (mha.v_proj, full.v_proj)):
            dst.weight.copy_(src.weight.view(HKV, D // H, D).repeat_interleave(rep, 0).reshape(D, D))
            dst.bias.copy_(src.bias.view(HKV, D // H).repeat_interleave(rep, 0).reshape(D))
        for a, b in ((mha.q_proj, full.q_proj), (mha.out_proj, full.out_proj)):
            b.load_state_dict(a.state_dict())
        full.attention.load_state_dict(mha.attention.state_dict())
    torch.testing.assert_close(out, full(x, **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", attnreg.list_variants())
def test_grouped_kv_reaches_the_variant_uncopied_only_if_declared(name: str) -> None:
    mha, seen = _mha(name, {}), []
    mha.attention.register_forward_pre_hook(lambda _m, args: seen.append(args[1].shape[1]))
    mha(_x())
    assert seen == [HKV if _caps(name).grouped_query else H]


@pytest.mark.parametrize("name,over", CASES)
def test_decode_equals_causal_forward(name: str, over: dict) -> None:
    mha, x, real = _mha(name, over), _x(), _left_pad()
    if not _caps(name).decoding:
        with pytest.raises(UnsupportedFeatureError, match=name):
            mha.init_state(B, max_length=L)
        with pytest.raises(UnsupportedFeatureError, match=name):
            mha.decode(x[:, :1], None)  # type: ignore[arg-type]
        return
    full = mha(x, key_mask=real, is_causal=True)  # (B, L, D)
    state = mha.init_state(B, max_length=L)
    assert state.heads == (HKV if _caps(name).grouped_query else H) and state.dtype == F64
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, L)):  # prefill, 4 steps, a chunk
        out, state = mha.decode(x[:, lo:hi], state, key_mask=real[:, lo:hi])
        assert out.shape == (B, hi - lo, D)
        outs.append(out)
    assert state.length == L
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)


def test_init_state_overrides_must_match_the_parameters() -> None:
    """decode projects x with the parameters, so a state of another dtype/device is useless."""
    mha = _mha("dot_product", {})
    with pytest.raises(ValueError, match=r"dtype=torch.float32 differs from the module's parameters"):
        mha.init_state(B, dtype=torch.float32)
    with pytest.raises(ValueError, match="device=meta differs"):
        mha.init_state(B, device="meta")
    state = mha.init_state(B, dtype=F64, device="cpu:0")  # the parameters' own, spelled otherwise
    out, _ = mha.decode(_x(2), state)
    assert out.shape == (B, 2, D)


@pytest.mark.parametrize("name", [n for n in attnreg.list_variants() if _caps(n).decoding])
def test_forward_passes_causal_alignment_through(name: str) -> None:
    """lower_right: the last T positions of a sequence, against all its keys, equal the last T
    rows of the causal forward (what a prefill continuing a cache computes)."""
    over = dict(attnreg.get_variant(name).check_configs[0]) if attnreg.get_variant(name).check_configs else {}
    mha, x = _mha(name, over), _x()
    full = mha(x, is_causal=True)  # (B, L, D)
    tail = mha(x[:, 8:], x, is_causal=True, causal_alignment="lower_right")  # (B, 5, D)
    torch.testing.assert_close(tail, full[:, 8:], rtol=0, atol=1e-10)
