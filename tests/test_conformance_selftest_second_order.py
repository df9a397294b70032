"""Self-test of the ``double_backward`` check and of the core's second-order guard: a variant
that claims double backward but has a once-differentiable backward, and one that declares it
False but bypasses the guard so that a gradient penalty is silently dropped, are both caught;
the textbook variant passes both ways."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conformance_toys import ALL, Textbook, spec_for
from torch import Tensor
from torch.autograd.function import once_differentiable

import attnreg
from attnreg.conformance import CheckFailure, run_check
from attnreg.core import Capabilities, Masks, UnsupportedFeatureError, VariantSpec, check_inputs

TWICE = Capabilities(**{**ALL.flags(), "double_backward": True}, complexity=ALL.complexity)


class _Once(torch.autograd.Function):
    """Runs ``fn(q, k, v)`` as one fused op with a backward autograd cannot differentiate again
    (the shape of linear's hand-written kernel before it got a differentiable twin)."""

    @staticmethod
    def forward(ctx: Any, fn: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        with torch.enable_grad():
            ins = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            ctx.out, ctx.ins = fn(*ins), ins
        return ctx.out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *torch.autograd.grad(ctx.out, ctx.ins, grad))


class Twice(Textbook):
    """The textbook variant, declaring double_backward (plain autograd ops: true)."""

    variant = "selftest_twice"
    capabilities = TWICE


class ClaimsTwice(Twice):
    """Declares double_backward=True, but its output goes through a once-differentiable backward."""

    variant = "selftest_claims_twice"

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        return _Once.apply(lambda q, k, v: Textbook._attend(self, q, k, v, masks), query, key, value)


class DropsPenalty(Textbook):
    """Declares double_backward=False, but overrides forward (skipping the guard) and has a
    once-differentiable backward: a gradient taken with create_graph=True silently has no graph."""

    variant = "selftest_drops_penalty"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, **kw: Any) -> Tensor:
        masks = check_inputs(self.variant, self.capabilities, query, key, value, kw.get("attn_mask"),
                             kw.get("key_mask"), kw.get("is_causal", False),
                             kw.get("causal_alignment", "upper_left"))
        return _Once.apply(lambda q, k, v: self._attend(q, k, v, masks), query, key, value)


@pytest.fixture(scope="module")
def registered() -> Iterator[dict[str, VariantSpec]]:
    specs = {cls.variant: spec_for(cls) for cls in (Textbook, Twice, ClaimsTwice, DropsPenalty)}
    for spec in specs.values():
        attnreg.register(spec)
    try:
        yield specs
    finally:
        for name in specs:
            attnreg.unregister(name)


@pytest.mark.parametrize("cls", [Textbook, Twice], ids=lambda c: c.variant)
def test_correct_variants_pass(registered: dict[str, VariantSpec], cls: type[Textbook]) -> None:
    run_check(cls.variant, "double_backward")


def test_a_false_claim_of_double_backward_is_caught(registered: dict[str, VariantSpec]) -> None:
    with pytest.raises(CheckFailure, match=r"gradgradcheck of query, key, value \(B=1 .*\) failed: .*mismatch"
                       ):
        run_check(ClaimsTwice.variant, "double_backward")


def test_a_silently_dropped_penalty_is_caught(registered: dict[str, VariantSpec]) -> None:
    with pytest.raises(CheckFailure, match="does not require grad"):
        run_check(DropsPenalty.variant, "double_backward")


def test_guard_keeps_first_order_and_refuses_second_order(registered: dict[str, VariantSpec]) -> None:
    """Declared False: plain and create_graph first-order gradients (and torch.func.grad) are the
    unguarded ones; differentiating again raises UnsupportedFeatureError naming the variant."""
    guarded, free = attnreg.build(Textbook.variant).double(), attnreg.build(Twice.variant).double()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    want = torch.autograd.grad(free(q, k, v, is_causal=True).square().sum(), (q, k, v))
    plain = torch.autograd.grad(guarded(q, k, v, is_causal=True).square().sum(), (q, k, v))
    graph = torch.autograd.grad(guarded(q, k, v, is_causal=True).square().sum(), (q, k, v), create_graph=True)
    for a, b, c in zip(plain, graph, want, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c) and b.requires_grad
    with pytest.raises(UnsupportedFeatureError, match="selftest_textbook.*second-order"):
        torch.autograd.grad(graph[0].sum(), q)
    fg = torch.func.grad(lambda q: guarded(q, k.detach(), v.detach()).square().sum())(q.detach())
    assert torch.equal(fg, torch.autograd.grad(free(q, k, v).square().sum(), q)[0])
    with torch.no_grad():  # no autograd: nothing guarded, nothing recorded
        assert not guarded(q, k, v).requires_grad
