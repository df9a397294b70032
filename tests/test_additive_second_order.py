"""additive: second-order gradients through the chunked fast path (``create_graph=True`` takes a
differentiable recomputation of the chunks) against the float64 reference formula."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import attnreg
from attnreg.core import check_inputs
from attnreg.plugins.additive.reference import additive_reference

B, H, E, EV = 2, 2, 4, 3


def _module(chunk: int, dropout: float = 0.0):
    torch.manual_seed(0)
    return attnreg.build("additive", num_heads=H, head_dim=E, hidden_dim=5, chunk_size=chunk,
                         dropout=dropout).double()


def _inputs(lq: int, lk: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=torch.float64).requires_grad_()
                 for n, d in ((lq, E), (lk, E), (lk, EV)))


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"key_mask": "hole"}, {"attn_mask": "float"}],
                         ids=("plain", "causal", "key_mask", "float_mask"))
def test_gradient_penalty_matches_the_reference(kw: dict) -> None:
    """d/d(inputs, parameters) of |d out / d (q, k)|^2, chunks of 3 over 7 queries (ragged)."""
    m = _module(3)
    q, k, v = _inputs(7, 6)
    kw = dict(kw)
    if kw.get("key_mask") == "hole":
        kw["key_mask"] = torch.tensor([[True, True, False, True, True, True]] * B)
    if kw.get("attn_mask") == "float":
        g = torch.Generator().manual_seed(2)
        kw["attn_mask"] = torch.randn(1, H, 7, 6, generator=g, dtype=torch.float64)  # (1, H, Lq, Lk)
    masks = check_inputs("additive", m.capabilities, q, k, v, kw.get("attn_mask"), kw.get("key_mask"),
                         kw.get("is_causal", False))
    wrt = [q, k, v, *m.parameters()]

    def penalty(out):
        g = torch.autograd.grad(out.square().sum(), (q, k), create_graph=True)
        assert all(x.requires_grad for x in g)  # not silently dropped
        return torch.autograd.grad(sum(x.square().sum() for x in g), wrt)

    got = penalty(m(q, k, v, **kw))
    want = penalty(additive_reference(q, k, v, masks, m.w_q, m.w_k, m.b, m.v, m.scale)[0])
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_gradgradcheck_inputs_and_parameters() -> None:
    m = _module(2)
    q, k, v = (t[:1, :, :4].detach().requires_grad_() for t in _inputs(4, 4))
    assert gradgradcheck(lambda q, k, v: m(q, k, v, is_causal=True), (q, k, v), eps=1e-6, atol=1e-5)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def by_params(*ps):
        inputs = (q.detach(), k.detach(), v.detach())
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), inputs)

    assert gradgradcheck(by_params, params, eps=1e-6, atol=1e-5)


def test_dropout_create_graph_uses_the_forward_masks() -> None:
    """With dropout, the differentiable recomputation regenerates each chunk's keep-mask: the
    gradient taken with create_graph=True equals the plain one of the same forward."""
    m = _module(3, dropout=0.5).train()
    q, k, v = _inputs(7, 7)
    torch.manual_seed(5)
    out = m(q, k, v)
    plain = torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    graph = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graph, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        assert b.requires_grad
