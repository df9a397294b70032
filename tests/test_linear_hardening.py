"""linear / performer under hostile inputs: NaN and inf at masked positions (future keys and values
under is_causal, padding, not-yet-seen decoding positions), extreme feature scales (the relative
normaliser floor), and second-order gradients."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.linear import LinearAttention
from attnreg.plugins.linear.kernels import linear_attention
from attnreg.plugins.linear.reference import linear_reference

POISONS = (float("nan"), float("inf"), float("-inf"))
# (name, overrides): every feature map, several chunks and segments at these lengths.
SUBJECTS = (
    ("linear", {"chunk_size": 4, "segment_size": 8}),
    ("linear", {"chunk_size": 4, "segment_size": 8, "feature_map": "relu"}),
    ("linear", {"chunk_size": 3, "segment_size": 6, "feature_map": "favor", "num_features": 16}),
    ("performer", {"chunk_size": 4, "segment_size": 8, "num_features": 16}),
)
IDS = ("elu", "relu", "linear-favor", "performer")


def _build(name: str, **kw: object) -> LinearAttention:
    return attnreg.build(name, **kw).double()  # type: ignore[return-value]


def _qkv(b: int, h: int, lq: int, lk: int, e: int = 4, ev: int = 3, seed: int = 0, std: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = std * torch.randn(b, h, lq, e, generator=g, dtype=torch.float64)  # (B, H, Lq, E)
    k = std * torch.randn(b, h, lk, e, generator=g, dtype=torch.float64)  # (B, H, Lk, E)
    v = torch.randn(b, h, lk, ev, generator=g, dtype=torch.float64)  # (B, H, Lk, Ev)
    return q, k, v


def _run(m, q, k, v, t: int, create_graph: bool, **kw):
    """Output, and the gradients of a loss on outputs <= t (optionally with a graph)."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = m(q, k, v, is_causal=True, **kw)
    probe = torch.arange(1.0, out.shape[-1] + 1, dtype=out.dtype)  # (Ev,)
    grads = torch.autograd.grad((out[:, :, : t + 1] * probe).sum(), (q, k, v), create_graph=create_graph)
    if create_graph:
        assert all(g.requires_grad for g in grads)  # a gradient penalty is not silently dropped
    return out.detach(), [g.detach() for g in grads]


# -- item: NaN / inf at masked positions -----------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS, ids=IDS)
@pytest.mark.parametrize("poison,target", [(float("nan"), "key"), (float("nan"), "value"),
                                           (float("inf"), "key"), (float("inf"), "value"),
                                           (float("-inf"), "key")],
                         ids=("nan-key", "nan-value", "inf-key", "inf-value", "-inf-key"))
@pytest.mark.parametrize("lq,lk,align", [(13, 13, "upper_left"), (9, 13, "lower_right"),
                                         (13, 9, "upper_left"), (13, 9, "lower_right")])
@pytest.mark.parametrize("create_graph", [False, True])
def test_future_poison_does_not_leak(subject, poison: float, target: str, lq: int, lk: int, align: str,
                                     create_graph: bool) -> None:
    """NaN / inf in future keys or values: outputs <= t and the gradients of a loss on them are
    bit-for-bit those of clean inputs, later positions get exactly 0 gradient (first order and
    with create_graph), and rows that do read the poison are not silently cleaned."""
    m = _build(subject[0], **subject[1])
    q, k, v = _qkv(2, 2, lq, lk, seed=lq + lk)
    km = torch.ones(2, lk, dtype=torch.bool)
    km[1, 2] = False  # a hole in the past, too
    offset = lk - lq if align == "lower_right" else 0
    t = 4  # the loss reads queries <= t; keys from t + offset + 1 on are in their future
    p = t + offset + 1
    kw = {"key_mask": km, "causal_alignment": align}
    clean_out, clean_g = _run(m, q, k, v, t, create_graph, **kw)
    k2, v2 = k.clone(), v.clone()
    (k2 if target == "key" else v2)[:, :, p:] = poison
    out, grads = _run(m, q, k2, v2, t, create_graph, **kw)
    assert torch.equal(out[:, :, : t + 1], clean_out[:, :, : t + 1])
    w = m.attention_weights(q, k2, is_causal=True, **kw)
    assert torch.equal(w[:, :, : t + 1], m.attention_weights(q, k, is_causal=True, **kw)[:, :, : t + 1])
    for name, a, b in zip("qkv", grads, clean_g, strict=True):
        assert torch.equal(a, b), f"gradient w.r.t. {name}"
    assert (grads[1][:, :, p:] == 0).all() and (grads[2][:, :, p:] == 0).all()
    assert (grads[0][:, :, t + 1:] == 0).all()
    if poison != poison:  # NaN: every row that reads it is NaN (not cleaned, not hidden)
        readers = slice(max(0, p - offset), lq)
        assert torch.isnan(out[:, :, readers]).any(dim=-1).all()


@pytest.mark.parametrize("subject", SUBJECTS, ids=IDS)
@pytest.mark.parametrize("poison", POISONS, ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("causal", [False, True])
def test_padding_poison_nan_inf(subject, poison: float, causal: bool) -> None:
    """NaN / inf in padded keys and values: outputs, weights and gradients as with clean padding,
    exactly 0 gradient at the padding (first and second order)."""
    m = _build(subject[0], **subject[1])
    q, k, v = _qkv(2, 2, 11, 11, seed=5)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[0, 8:] = False
    km[1, 3] = False
    pad = ~km[:, None, :, None]  # (B, 1, Lk, 1)

    def run(k, v):
        q1, k1, v1 = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = m(q1, k1, v1, key_mask=km, is_causal=causal)
        g = torch.autograd.grad(out.square().sum(), (q1, k1, v1), create_graph=True)
        gg = torch.autograd.grad(sum(x.square().sum() for x in g), (q1, k1, v1))  # a gradient penalty
        return out.detach(), m.attention_weights(q, k, key_mask=km, is_causal=causal), g, gg

    clean = run(k, v)
    dirty = run(k.masked_fill(pad, poison), v.masked_fill(pad, poison))
    assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[1], clean[1])
    for order in (2, 3):
        for a, b in zip(dirty[order], clean[order], strict=True):
            assert torch.equal(a, b)
        for g in dirty[order][1:]:  # key, value
            assert (g.masked_select(pad.expand_as(g)) == 0).all()


@pytest.mark.parametrize("subject", SUBJECTS, ids=IDS)
@pytest.mark.parametrize("poison", (float("nan"), float("inf")), ids=("nan", "inf"))
@pytest.mark.parametrize("call", [3, 9])  # one direct chunk (<= chunk_size), a prefill (> chunk_size)
def test_decode_poison_in_positions_not_yet_seen(subject, poison: float, call: int) -> None:
    """A decode call with T positions: poison in its last positions leaves its earlier outputs as
    without (bit for bit) and the gradients of a loss on them too (to rounding: a poisoned short
    call runs the streamed kernel, which keeps the poison out, instead of the direct update)."""
    m = _build(subject[0], **subject[1])
    b, h, pre, cut = 2, 2, 7, 2  # prefill 7, then a call of `call` whose positions >= cut are poisoned
    q, k, v = _qkv(b, h, pre + call, pre + call, seed=call)

    def run(k, v):
        q1, k1, v1 = (x.clone().requires_grad_(True) for x in (q, k, v))
        state = m.init_state(b, h, q.shape[-1], v.shape[-1], dtype=torch.float64)
        first, state = m.decode(q1[:, :, :pre], k1[:, :, :pre], v1[:, :, :pre], state)
        out, state = m.decode(q1[:, :, pre:], k1[:, :, pre:], v1[:, :, pre:], state)
        loss = first.sum() + out[:, :, :cut].sum()
        return out.detach(), torch.autograd.grad(loss, (q1, k1, v1))

    clean_out, clean_g = run(k, v)
    for target in ("key", "value"):
        k2, v2 = k.clone(), v.clone()
        (k2 if target == "key" else v2)[:, :, pre + cut:] = poison
        out, grads = run(k2, v2)
        assert torch.equal(out[:, :, :cut], clean_out[:, :, :cut])
        for a, c in zip(grads, clean_g, strict=True):
            assert (a - c).abs().max().item() <= 1e-12
        assert not torch.isfinite(out[:, :, cut:]).all()


# -- item: rows stay normalised at any scale of the features ---------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_elu_very_negative_inputs_stay_normalised(dtype: torch.dtype, causal: bool) -> None:
    """q = k = -40: elu+1 features e^-40 (elu(x) + 1 rounded them to 0), equal for every key, so
    every row is the plain average of the values it sees; the decoding state agrees."""
    m = attnreg.build("linear", chunk_size=4, segment_size=8).to(dtype)
    b, h, n, e = 2, 2, 11, 4
    q = torch.full((b, h, n, e), -40.0, dtype=dtype)
    k = q.clone()
    v = torch.randn(b, h, n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    w = m.attention_weights(q, k, is_causal=causal)
    assert (w.sum(-1).double() - 1).abs().max().item() <= 1e-6
    counts = torch.arange(1, n + 1, dtype=torch.float64)[:, None] if causal else float(n)
    want = (v.double().cumsum(2) / counts) if causal else v.double().mean(2, keepdim=True).expand_as(v)
    out = m(q, k, v, is_causal=causal)
    assert (out.double() - want).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-5)
    if causal:
        state = m.init_state(b, h, e, 3, dtype=dtype)
        dec, _ = m.decode(q, k, v, state)
        assert (dec.double() - out.double()).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_logits_rows_sum_to_one(dtype: torch.dtype, causal: bool) -> None:
    """q, k ~ N(0, 16), E = 64 (the FAVOR+ estimate is poor here, see the docs' table): every row
    of the weights still sums to 1 (before: about 1e-30), forward == weights @ V."""
    m = attnreg.build("performer").to(dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64) * s for s in (4.0, 4.0, 1.0))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    w = m.attention_weights(q, k, is_causal=causal)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (w.sum(-1).double() - 1).abs().max().item() <= tol
    assert (m(q, k, v, is_causal=causal).double() - (w @ v).double()).abs().max().item() <= 10 * tol


@pytest.mark.parametrize("fmap", ["relu", "identity"])  # relu(a x) = a relu(x) for a > 0
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [1e-20, 0.3])  # 0.3: many rows take the floor
def test_output_does_not_depend_on_the_scale_of_the_features(fmap: str, causal: bool, eps: float) -> None:
    """Rescaling each query row's features (by about e^-100 .. e^100) and all key features (by 1e-30)
    leaves the kernel's output unchanged, rows on the floor included: the floor is relative."""
    g = torch.Generator().manual_seed(1)
    q = torch.rand(2, 2, 19, 5, generator=g, dtype=torch.float64)  # non-negative: features as they are
    k = torch.rand(2, 2, 19, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 19, 3, generator=g, dtype=torch.float64)
    if fmap == "relu":
        q, k = q - 0.5, k - 0.5  # mixed signs
    alpha = torch.exp(40 * torch.randn(2, 2, 19, 1, generator=g, dtype=torch.float64))  # per row, ~e^+-100
    base = linear_attention(q, k, v, fmap, None, eps, causal, 4, torch.float64, 8)
    scaled = linear_attention(q * alpha, k * 1e-30, v, fmap, None, eps, causal, 4, torch.float64, 8)
    assert (scaled - base).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_floor_matches_the_reference_forward_and_backward(fmap: str, causal: bool) -> None:
    """With a large relative floor (eps = 0.3, many rows damped) forward, weights and gradients
    equal the float64 reference ``num / max(den, eps |phi_q|_1 |z_i|_1)``, several segments."""
    m = attnreg.build("linear", feature_map=fmap, eps=0.3, num_features=16, chunk_size=4, segment_size=8)
    q, k, v = (x.requires_grad_(True) for x in _qkv(2, 2, 23, 23, e=5, seed=3))
    km = torch.rand(2, 23, generator=torch.Generator().manual_seed(2)) > 0.2
    masks = check_inputs("linear", m.capabilities, q, k, v, None, km, causal)
    proj = m.projection(5, q.device, torch.float64) if fmap == "favor" else None
    scale = m.softmax_scale(5) if fmap == "favor" else 1.0
    ref, ref_w = linear_reference(q, k, v, masks, fmap, 0.3, proj, scale)
    w = m.attention_weights(q, k, key_mask=km, is_causal=causal)
    live = ref_w.sum(-1) > 0
    assert ((ref_w.sum(-1)[live] - 1).abs() > 1e-3).any(), "no row takes the floor: the test tests nothing"
    assert (w - ref_w).abs().max().item() <= 1e-10
    out = m(q, k, v, key_mask=km, is_causal=causal)
    assert (out - ref).abs().max().item() <= 1e-10
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    for a, b in zip(torch.autograd.grad((out * probe).sum(), (q, k, v)),
                    torch.autograd.grad((ref * probe).sum(), (q, k, v)), strict=True):
        assert (a - b).abs().max().item() <= 1e-10


def test_eps_defaults_per_feature_map() -> None:
    assert attnreg.build("linear").eps == 1e-20 and attnreg.build("performer").eps == 1e-20
    assert attnreg.build("linear", feature_map="relu").eps == 1e-6
    assert attnreg.build("linear", feature_map="favor", eps=1e-3).eps == 1e-3


# -- item: second-order gradients ------------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS + (("linear", {"eps": 0.3, "chunk_size": 2}),),
                         ids=IDS + ("elu-floor",))
@pytest.mark.parametrize("kw", [{}, {"is_causal": True, "key_mask": "hole"},
                                {"is_causal": True, "causal_alignment": "lower_right", "lk": 4}],
                         ids=("plain", "causal+key_mask", "lq>lk"))
def test_gradgradcheck(subject, kw: dict) -> None:
    """Every Jacobian entry (the conformance check adds the other mask kinds, lower-right with
    Lq < Lk and decoding, as random projections)."""
    fields = {**subject[1], "num_features": 8} if "num_features" in subject[1] else subject[1]
    m = _build(subject[0], **fields)
    kw = dict(kw)
    lq, lk = kw.pop("lq", 6), kw.pop("lk", 6)
    if kw.get("key_mask") == "hole":
        kw["key_mask"] = torch.tensor([[True, False, True, True, True, True]])
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, lq, lk, e=3, ev=2, seed=lq * lk))
    fn = lambda q, k, v: m(q, k, v, **kw)  # noqa: E731
    assert gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)
    assert gradgradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("fmap", ["elu", "relu", "favor"])
def test_gradient_penalty_matches_the_reference(fmap: str) -> None:
    """d/dtheta |d out / d q|^2 through the kernel equals the same through the dense reference."""
    m = attnreg.build("linear", feature_map=fmap, num_features=8, chunk_size=4, segment_size=8)
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 17, 17, seed=9))
    masks = check_inputs("linear", m.capabilities, q, k, v, None, None, True)
    proj = m.projection(4, q.device, torch.float64) if fmap == "favor" else None
    scale = m.softmax_scale(4) if fmap == "favor" else 1.0

    def penalty(out):
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(gq.square().sum(), (q, k, v))

    got = penalty(m(q, k, v, is_causal=True))
    want = penalty(linear_reference(q, k, v, masks, fmap, m.eps, proj, scale)[0])
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


def test_decoding_is_twice_differentiable() -> None:
    """Through decode (a prefill over two chunks, a single token, a short chunk)."""
    m = _build("linear", chunk_size=2, segment_size=2)
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 6, 6, e=2, ev=2, seed=1))

    def fn(q, k, v):
        state = m.init_state(1, 1, 2, 2, dtype=torch.float64)
        outs = []
        for a, z in ((0, 3), (3, 4), (4, 6)):  # the streamed kernel (3 > chunk 2), one token, a chunk
            out, state = m.decode(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state)
            outs.append(out)
        return torch.cat(outs, dim=2)

    assert gradgradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
