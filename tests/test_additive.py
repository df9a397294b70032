"""Additive (Bahdanau) attention: the chunked, checkpointed fast path against the float64 naive
broadcast formula (forward, weights, and gradients w.r.t. inputs and every parameter)."""

from __future__ import annotations

import math

import pytest
import torch

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.additive import AdditiveAttention, AdditiveConfig
from attnreg.plugins.additive.reference import additive_reference

TOL = 1e-10
B, H, E, EV = 2, 2, 8, 5


def _module(
    chunk: int | None, hidden: int | None = 6, scale: float | None = None, seed: int = 0
) -> AdditiveAttention:
    torch.manual_seed(seed)
    cfg = AdditiveConfig(num_heads=H, head_dim=E, hidden_dim=hidden, chunk_size=chunk, scale=scale)
    return AdditiveAttention(cfg).double()


def _inputs(lq: int, lk: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, lq, E, generator=g, dtype=torch.float64).requires_grad_()  # (B, H, Lq, E)
    k = torch.randn(B, H, lk, E, generator=g, dtype=torch.float64).requires_grad_()  # (B, H, Lk, E)
    v = torch.randn(B, H, lk, EV, generator=g, dtype=torch.float64).requires_grad_()  # (B, H, Lk, Ev)
    return q, k, v


def _check_against_reference(m: AdditiveAttention, q, k, v, **mask_kw) -> torch.Tensor:
    """Fast forward, weights and all gradients equal the float64 reference within TOL."""
    out = m(q, k, v, **mask_kw)  # (B, H, Lq, Ev)
    masks = check_inputs("additive", m.capabilities, q, k, v, mask_kw.get("attn_mask"),
                         mask_kw.get("key_mask"), mask_kw.get("is_causal", False))
    ref, ref_w = additive_reference(q, k, v, masks, m.w_q, m.w_k, m.b, m.v, m.scale)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    w = m.attention_weights(q, k, **mask_kw)  # (B, H, Lq, Lk)
    torch.testing.assert_close(w, ref_w, atol=TOL, rtol=0)
    wrt = [q, k, v, *m.parameters()]
    assert len(wrt) == 7  # q, k, v, w_q, w_k, b, v_h
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, wrt, upstream)
    want = torch.autograd.grad(ref, wrt, upstream)
    # With a row that has a real choice (>= 2 keys) every gradient is non-zero: the test has teeth.
    has_choice = bool(((ref_w > 0).sum(-1) > 1).any())
    for name, a, b in zip(["q", "k", "v", "w_q", "w_k", "b", "v_h"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda s, n=name: f"grad {n}: {s}")
        assert b.abs().max() > 0 or not (has_choice or name == "v"), f"reference grad {name} is all zero"
    return out


# (Lq, Lk, chunk): chunks that divide the length, that do not, larger than it, and cross attention.
SIZES = [
    (1, 1, 1), (1, 7, 4), (7, 7, 1), (7, 7, 3), (7, 7, 7), (7, 7, 64),
    (130, 130, 13), (130, 130, 32), (7, 130, 3), (130, 7, 32),
]


@pytest.mark.parametrize("lq,lk,chunk", SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_unmasked_and_causal(lq: int, lk: int, chunk: int, causal: bool) -> None:
    m = _module(chunk)
    _check_against_reference(m, *_inputs(lq, lk), is_causal=causal)


def _bool_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > 0.3


@pytest.mark.parametrize("lq,lk,chunk", [(7, 7, 3), (130, 130, 32), (7, 130, 4), (130, 7, 13)])
@pytest.mark.parametrize(
    "kind", ["full", "lq_lk", "head_key", "batch_row", "key_only", "key_mask", "float", "all"]
)
def test_matches_reference_with_masks(lq: int, lk: int, chunk: int, kind: str) -> None:
    m = _module(chunk, scale=0.7)
    q, k, v = _inputs(lq, lk)
    shapes = {
        "full": (B, H, lq, lk), "lq_lk": (lq, lk), "head_key": (1, H, 1, lk),
        "batch_row": (B, 1, lq, 1), "key_only": (lk,),
    }
    kw: dict = {}
    if kind in shapes:
        kw["attn_mask"] = _bool_mask(shapes[kind], seed=3)
    elif kind == "key_mask":
        kw["key_mask"] = _bool_mask((B, lk), seed=4)
    elif kind == "float":
        fm = torch.randn(B, 1, lq, lk, dtype=torch.float64)  # (B, 1, Lq, Lk)
        kw["attn_mask"] = fm.masked_fill(_bool_mask((B, 1, lq, lk), seed=5).logical_not(), float("-inf"))
    else:  # every mask at once
        kw = {"attn_mask": _bool_mask((1, H, lq, lk), seed=6), "key_mask": _bool_mask((B, lk), seed=7),
              "is_causal": True}
    _check_against_reference(m, q, k, v, **kw)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fully_masked_rows_give_zero_and_finite_grads(chunk: int) -> None:
    m = _module(chunk)
    q, k, v = _inputs(7, 9)
    key_mask = torch.ones(B, 9, dtype=torch.bool)
    key_mask[1] = False  # batch 1 sees nothing
    attn_mask = torch.ones(7, 9, dtype=torch.bool)
    attn_mask[2] = False  # query row 2 sees nothing, in every batch
    out = _check_against_reference(m, q, k, v, attn_mask=attn_mask, key_mask=key_mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    w = m.attention_weights(q, k, attn_mask=attn_mask, key_mask=key_mask)
    assert torch.equal(w[1], torch.zeros_like(w[1]))
    out = m(q, k, v, attn_mask=attn_mask, key_mask=key_mask)
    out.sum().backward()
    for t in (q, k, v, *m.parameters()):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))  # nothing flows from empty rows
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


def test_gradcheck_tiny_with_dropout_is_consistent_across_recomputation() -> None:
    """Backward must use the forward's dropout masks (regenerated from the seed forward drew)."""
    torch.manual_seed(0)
    cfg = AdditiveConfig(num_heads=2, head_dim=3, hidden_dim=4, chunk_size=2, dropout=0.4)
    m = AdditiveAttention(cfg).double().train()
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v, *params):
        torch.manual_seed(123)
        return m(q, k, v, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, *m.parameters()))
    torch.manual_seed(123)
    with torch.no_grad():
        no_grad_out = m(q, k, v, is_causal=True)
    assert torch.equal(no_grad_out, fn(q, k, v))  # same masks with and without checkpointing
    m.eval()
    eval_out = m(q, k, v, is_causal=True)
    assert not torch.equal(eval_out, no_grad_out)  # dropout was really active in train mode
    torch.testing.assert_close(
        eval_out, m.attention_weights(q, k, is_causal=True) @ v, atol=TOL, rtol=0
    )


def _tensor_bytes(obj: object, seen: set[int]) -> int:
    """Bytes of the distinct tensors inside ``obj`` (tensors, lists/tuples/dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


def _bytes_kept_for_backward(length: int) -> int:
    """Bytes autograd keeps between forward and backward of a train-mode call with dropout:
    tensors packed by ``saved_tensors_hooks`` plus tensors stored as attributes of any graph
    node (a custom Function's ctx, e.g. a list of dropout masks)."""
    torch.manual_seed(0)
    cfg = AdditiveConfig(num_heads=H, head_dim=E, hidden_dim=6, chunk_size=16, dropout=0.3)
    m = AdditiveAttention(cfg).double().train()
    q, k, v = _inputs(length, length)
    seen: set[int] = set()
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = m(q, k, v)  # (B, H, L, Ev)
    total = _tensor_bytes(packed, seen)
    stack, nodes = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in nodes:
            continue
        nodes.add(id(node))
        total += _tensor_bytes(getattr(node, "__dict__", {}), seen)
        stack.extend(nxt for nxt, _ in node.next_functions)
    assert type(out.grad_fn).__name__ == "_ChunkedAdditiveBackward", "fast path not hit"
    out.sum().backward()  # the kept state is usable: backward runs
    assert q.grad is not None and q.grad.abs().max() > 0
    return total


def test_dropout_keeps_no_lq_by_lk_tensor_for_backward() -> None:
    """With dropout active, what autograd keeps grows linearly in L, not as Lq*Lk: the keep-masks
    are regenerated in backward from a seed, not stored (issue 5: bounded backward memory).
    Affine bytes a*L + b satisfy f(2L) <= 2 f(L); an (L, L) mask of B*H*L*L bools breaks it."""
    small, large = _bytes_kept_for_backward(256), _bytes_kept_for_backward(512)
    assert small > 0
    assert large <= 2 * small, f"kept {small} bytes at L=256 but {large} at L=512: superlinear"


def test_dropout_same_seed_gives_same_output_and_grads() -> None:
    """torch.manual_seed makes train-mode dropout reproducible, outputs and gradients; another
    seed draws other masks."""
    torch.manual_seed(0)
    cfg = AdditiveConfig(num_heads=H, head_dim=E, hidden_dim=6, chunk_size=3, dropout=0.5)
    m = AdditiveAttention(cfg).double().train()
    q, k, v = _inputs(10, 10)
    wrt = [q, k, v, *m.parameters()]

    def run(seed: int) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        out = m(q, k, v, is_causal=True)  # (B, H, L, Ev)
        return (out, *torch.autograd.grad(out.square().sum(), wrt))

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])


def test_checkpointing_keeps_no_pairwise_tensor_alive() -> None:
    """Autograd must not hold any (chunk, Lk, d_a)-sized tensor after forward: memory stays bounded."""
    lq = lk = 64
    m = _module(chunk=8, hidden=16)
    q, k, v = _inputs(lq, lk)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(q, k, v, is_causal=True)
    out.sum().backward()
    chunk_tensor = B * H * 8 * lk * 16  # one (B, H, chunk, Lk, d_a) tensor
    assert sizes, "no saved tensors recorded: the hook saw nothing"
    assert max(sizes) <= B * H * lq * max(16, EV, E)  # projections and inputs only
    assert max(sizes) < chunk_tensor


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_inputs(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    m = AdditiveAttention(AdditiveConfig(num_heads=H, head_dim=E, chunk_size=4))  # float32 params
    q, k, v = (t.detach().to(dtype) for t in _inputs(9, 11))
    out = m(q, k, v, is_causal=True)
    assert out.dtype == dtype
    masks = check_inputs("additive", m.capabilities, q, k, v, None, None, True)
    ref, _ = additive_reference(q, k, v, masks, m.w_q, m.w_k, m.b, m.v)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_benchmark_baseline_is_the_same_function() -> None:
    torch.manual_seed(0)
    m = attnreg.build("additive", num_heads=H, head_dim=E, chunk_size=5)
    q, k, v = (t.detach().float() for t in _inputs(12, 12))
    naive = m.benchmark_baselines()["naive"]
    for causal in (False, True):
        torch.testing.assert_close(naive(q, k, v, causal), m(q, k, v, is_causal=causal))
    assert not torch.allclose(naive(q, k, v, True), naive(q, k, v, False))


def test_flops_counts_attended_pairs() -> None:
    m = _module(4, hidden=6)
    lq, lk = 10, 7
    per_pair = 4 * 6 + 2 * EV
    proj = 2 * (lq + lk) * E * 6
    full = m.flops(B, H, lq, lk, E, EV, is_causal=False)
    assert full == B * H * (proj + lq * lk * per_pair)
    pairs = int(attnreg.core.causal_mask(lq, lk).sum())
    assert m.flops(B, H, lq, lk, E, EV, is_causal=True) == B * H * (proj + pairs * per_pair)


def test_config_defaults_alias_and_errors() -> None:
    m = attnreg.build("bahdanau", num_heads=3, head_dim=4)
    assert isinstance(m, AdditiveAttention) and m.config.variant == "additive"
    assert m.hidden_dim == 4 and m.score_scale == 1.0
    assert attnreg.get_variant("bahdanau").name == "additive"
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"w_q": (3, 4, 4), "w_k": (3, 4, 4), "b": (3, 4), "v": (3, 4)}
    with pytest.raises(attnreg.ConfigError, match="chunk_size"):
        attnreg.build("additive", num_heads=1, head_dim=4, chunk_size=0)
    with pytest.raises(attnreg.ConfigError, match="hidden_dim"):
        attnreg.build("additive", num_heads=1, head_dim=4, hidden_dim=0)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="num_heads = 3"):
        m(q, q, q)
    q = torch.randn(1, 3, 3, 5)
    with pytest.raises(ValueError, match="head_dim = 4"):
        m(q, q, q)


def test_init_is_nn_linear_like() -> None:
    torch.manual_seed(0)
    m = AdditiveAttention(AdditiveConfig(num_heads=4, head_dim=16, hidden_dim=64))
    for p, bound in ((m.w_q, 1 / math.sqrt(16)), (m.w_k, 1 / math.sqrt(16)), (m.b, 1 / math.sqrt(16)),
                     (m.v, 1 / math.sqrt(64))):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound  # uniform over the whole range, not a smaller one
    assert not torch.equal(m.w_q, m.w_k)


def test_state_dict_round_trip_and_declared_features() -> None:
    a = _module(3, seed=0)
    b = _module(3, seed=1)
    q, k, v = _inputs(5, 5)
    assert not torch.allclose(a(q, k, v), b(q, k, v))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(q, k, v), b(q, k, v), atol=0, rtol=0)
    assert all(AdditiveAttention.capabilities.flags()[f] for f in
               ("causal", "key_mask", "attn_mask", "float_mask", "cross_attention", "dropout", "learnable"))


def test_float_mask_gradient_matches_reference() -> None:
    """A float attn_mask that requires grad gets the same gradient as through the reference."""
    m = _module(3)
    q, k, v = _inputs(7, 9)
    fm = torch.randn(1, H, 7, 9, dtype=torch.float64).requires_grad_()  # (1, H, Lq, Lk)
    out = m(q, k, v, attn_mask=fm, is_causal=True)
    masks = check_inputs("additive", m.capabilities, q, k, v, fm, None, True)
    ref, _ = additive_reference(q, k, v, masks, m.w_q, m.w_k, m.b, m.v)
    upstream = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, [fm], upstream)
    (want,) = torch.autograd.grad(ref, [fm], upstream)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_auto_chunk_size_fits_the_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    import attnreg.plugins.additive.attention as attention_mod

    big = attnreg.build("additive", num_heads=8, head_dim=64)
    assert big.config.chunk_size is None
    assert big.chunk_rows(1, 2048) == 64  # 2**26 / (1 * 8 * 2048 * 64)
    assert big.chunk_rows(64, 2**16) == 1  # never below one row
    m = _module(chunk=None)
    assert m.chunk_rows(B, 9) > 9  # small inputs: one chunk
    _check_against_reference(m, *_inputs(9, 9), is_causal=True)
    monkeypatch.setattr(attention_mod, "WORKSPACE_ELEMENTS", B * H * 9 * 6 * 4)  # 4 rows (d_a=6)
    assert m.chunk_rows(B, 9) == 4
    _check_against_reference(m, *_inputs(9, 9), key_mask=_bool_mask((B, 9), seed=8))
