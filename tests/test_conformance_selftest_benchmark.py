"""Self-test of the benchmark-hook checks: a textbook softmax attention providing all three hooks
correctly passes them; copies each breaking one hook's contract are caught by that hook's check;
variants providing no hook get n.a."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch
import torch.nn.functional as F
from conformance_toys import Textbook, registered_toys
from torch import Tensor

import attnreg
from attnreg.conformance import CheckFailure, NotApplicable, run_check
from attnreg.core import Baseline, CausalAlignment, VariantSpec

# check -> the hook it checks
HOOK_OF = {"benchmark_pattern_mask": "pattern_mask", "benchmark_flops": "flops",
           "benchmark_baselines": "benchmark_baselines"}
HOOK_CHECKS = tuple(HOOK_OF)


class WithHooks(Textbook):
    """Textbook softmax attention with correct benchmark hooks: every key is in the pattern
    (the causal part under is_causal), the dense FLOP count, SDPA as the baseline."""

    variant = "selftest_bench_hooks"

    def pattern_mask(self, length: int, *, is_causal: bool, num_heads: int) -> Tensor:
        full = torch.ones(1, length, length, dtype=torch.bool)  # (1, L, L)
        return full.tril() if is_causal else full

    def flops(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
              *, is_causal: bool, causal_alignment: CausalAlignment = "upper_left") -> float:
        offset = k_len - q_len if causal_alignment == "lower_right" else 0
        pairs = sum(min(max(i + offset + 1, 0), k_len) for i in range(q_len)) if is_causal else q_len * k_len
        return 2.0 * batch * heads * pairs * (head_dim + value_dim)

    def benchmark_baselines(self) -> Mapping[str, Baseline]:
        def sdpa(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal,
                                                  scale=self.softmax_scale(query.shape[-1]))

        return {"sdpa": sdpa}


class PatternTooNarrow(WithHooks):
    """The pattern says a band of width 1, the weights use every key."""

    variant = "selftest_bench_narrow_pattern"

    def pattern_mask(self, length: int, *, is_causal: bool, num_heads: int) -> Tensor:
        i = torch.arange(length)
        band = (i[:, None] - i[None, :]).abs() <= 1  # (L, L)
        return (band & (i[None, :] <= i[:, None]) if is_causal else band)[None]  # (1, L, L)


class PatternIgnoresCausal(WithHooks):
    """The pattern leaves out the causal restriction (the old harness convention)."""

    variant = "selftest_bench_pattern_not_causal"

    def pattern_mask(self, length: int, *, is_causal: bool, num_heads: int) -> Tensor:
        return torch.ones(1, length, length, dtype=torch.bool)  # (1, L, L)


class PatternOldSignature(WithHooks):
    """``pattern_mask(L, is_causal=False)``: the signature before the hooks were declared."""

    variant = "selftest_bench_pattern_old_signature"

    def pattern_mask(self, L: int, is_causal: bool = False) -> Tensor:  # type: ignore[override]  # noqa: N803
        return super().pattern_mask(L, is_causal=is_causal, num_heads=1)


class FlopsIgnoreBatch(WithHooks):
    """Counts one batch item whatever the batch."""

    variant = "selftest_bench_flops_one_item"

    def flops(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
              *, is_causal: bool, causal_alignment: CausalAlignment = "upper_left") -> float:
        return super().flops(1, heads, q_len, k_len, head_dim, value_dim, is_causal=is_causal,
                             causal_alignment=causal_alignment)


class FlopsZeroAtOne(WithHooks):
    """Counts only pairs below the diagonal: 0 FLOPs at L = 1."""

    variant = "selftest_bench_flops_zero"

    def flops(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
              *, is_causal: bool, causal_alignment: CausalAlignment = "upper_left") -> float:
        return 2.0 * batch * heads * (q_len * (q_len - 1) // 2) * (head_dim + value_dim)


class BaselineUnscaled(WithHooks):
    """The baseline forgets the softmax scale 1/sqrt(E)."""

    variant = "selftest_bench_baseline_unscaled"

    def benchmark_baselines(self) -> Mapping[str, Baseline]:
        def sdpa(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=1.0)

        return {"sdpa": sdpa}


class BaselineWithoutCausal(WithHooks):
    """A baseline taking ``(query, key, value)`` only."""

    variant = "selftest_bench_baseline_three_args"

    def benchmark_baselines(self) -> Mapping[str, Baseline]:
        return {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}  # type: ignore[dict-item]


BROKEN = {
    PatternTooNarrow: ("benchmark_pattern_mask", "non-zero weight outside the pattern"),
    PatternIgnoresCausal: ("benchmark_pattern_mask", "weight of exactly 0 inside the pattern"),
    PatternOldSignature: ("benchmark_pattern_mask", "documented signature"),
    FlopsIgnoreBatch: ("benchmark_flops", "not twice as much"),
    FlopsZeroAtOne: ("benchmark_flops", "finite number > 0"),
    BaselineUnscaled: ("benchmark_baselines", "max |error|"),
    BaselineWithoutCausal: ("benchmark_baselines", "documented signature"),
}


@pytest.fixture(scope="module")
def registered() -> Iterator[dict[str, VariantSpec]]:
    with registered_toys(Textbook, WithHooks, *BROKEN) as specs:
        yield specs


@pytest.mark.parametrize("check", HOOK_CHECKS)
def test_correct_hooks_pass(registered: dict[str, VariantSpec], check: str) -> None:
    assert WithHooks.benchmark_hooks() == frozenset(("pattern_mask", "flops", "benchmark_baselines"))
    run_check(WithHooks.variant, check)


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.variant)
def test_a_broken_hook_is_caught_by_its_check(registered: dict[str, VariantSpec], cls: type) -> None:
    check, message = BROKEN[cls]
    with pytest.raises(CheckFailure) as caught:
        run_check(cls.variant, check)
    assert message in str(caught.value), caught.value
    for other in HOOK_CHECKS:  # only the broken hook fails
        if other != check:
            run_check(cls.variant, other)


@pytest.mark.parametrize("check", HOOK_CHECKS)
def test_no_hook_is_not_applicable(registered: dict[str, VariantSpec], check: str) -> None:
    assert Textbook.benchmark_hooks() == frozenset()
    with pytest.raises(NotApplicable, match="provides no"):
        run_check(Textbook.variant, check)
    with pytest.raises(NotApplicable):
        run_check("dot_product", check)


@pytest.mark.parametrize("name,hooks", [
    ("local", {"pattern_mask", "flops", "benchmark_baselines"}),
    ("sparse", {"pattern_mask", "flops", "benchmark_baselines"}),
    ("bigbird", {"pattern_mask", "flops", "benchmark_baselines"}),
    ("additive", {"flops", "benchmark_baselines"}),
    ("linear", {"flops", "benchmark_baselines"}),
    ("performer", {"flops", "benchmark_baselines"}),
    ("dot_product", set()),
])
def test_builtin_hooks_are_declared_and_pass(name: str, hooks: set[str]) -> None:
    assert attnreg.get_variant(name).factory.benchmark_hooks() == hooks  # type: ignore[attr-defined]
    for check in HOOK_CHECKS:
        try:
            run_check(name, check)
        except NotApplicable:
            assert HOOK_OF[check] not in hooks
        else:
            assert HOOK_OF[check] in hooks
