"""The optional benchmark hooks of a variant: what ``attnreg bench`` asks a module for.

``Attention`` inherits ``BenchmarkHooks``: a variant provides a hook by overriding the method
with exactly the signature below (the defaults say "not provided"), and the conformance suite
checks every provided hook (group ``benchmark``). Nothing else calls them; a variant that
provides none is benchmarked against dense SDPA only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from .masks import CausalAlignment

__all__ = ["BENCHMARK_HOOKS", "Baseline", "BenchmarkHooks"]

class Baseline(Protocol):
    """A naive formulation of a variant, timed against it by the benchmark:
    ``baseline(query, key, value, is_causal) -> out`` with the shapes and result of ``forward``
    (query (B, H, L, E), key (B, H, L, E), value (B, H, L, Ev) -> (B, H, L, Ev); no masks)."""

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool, /) -> Tensor: ...

BENCHMARK_HOOKS = ("pattern_mask", "flops", "benchmark_baselines")


class BenchmarkHooks:
    """Optional methods the benchmark uses; override one to provide it (see each docstring)."""

    def pattern_mask(self, length: int, *, is_causal: bool, num_heads: int) -> Tensor | None:
        """The positions a query may attend to, independent of the data: a bool ``(H, L, L)``
        tensor (or ``(1, L, L)`` when the same for every head), True where query i of a
        self-attention call of length ``length`` with ``num_heads`` heads may see key j, the
        causal restriction included when ``is_causal``. It must equal the support (non-zero
        entries) of ``attention_weights`` on unmasked inputs: the conformance check
        ``benchmark_pattern_mask`` compares them.

        The benchmark times dense SDPA with this pattern as its mask next to the variant
        (``sdpa_masked[V]``: an additive 0/-inf float mask; ``sdpa_masked_bool[V]``: the bool
        mask itself), which is how a user would compute the same attention without the variant,
        and skips the variant's own ``sdpa_dense...`` baselines as duplicates of them.
        Default: None (no fixed pattern; the masked baselines are not timed).
        """
        return None

    def flops(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
              *, is_causal: bool, causal_alignment: CausalAlignment = "upper_left") -> float | None:
        """Useful forward FLOPs (a multiply-add counts 2) of ``forward`` on query (batch, heads,
        q_len, head_dim), key (batch, heads, k_len, head_dim), value (batch, heads, k_len,
        value_dim) with ``is_causal`` / ``causal_alignment`` and no masks. Positive, linear in
        ``batch``, non-decreasing in the lengths; sizes ``forward`` refuses raise ``ValueError``
        (checked by ``benchmark_flops``).

        The benchmark reports GFLOP/s and the fraction of the measured GEMM roof from it (a
        forward+backward point counts 3x the forward). Default: None (not reported; dense SDPA
        gets the dense count).
        """
        return None

    def benchmark_baselines(self) -> Mapping[str, Baseline]:
        """Naive formulations of this module to time against it, by name: each a ``Baseline``,
        ``fn(query, key, value, is_causal) -> out`` computing what ``forward`` computes (with
        this module's scale and parameters), only the slow way (e.g. materialising what the
        fast path avoids). ``benchmark_baselines`` checks that they agree with ``forward``.

        The benchmark times each as the series ``V:name`` at every point it times the variant;
        one named ``sdpa_dense...`` is skipped where ``pattern_mask`` is provided (the bench's
        own ``sdpa_masked_bool[V]`` is the same measurement). Not SDPA with the pattern: the
        bench does that already. Default: none.
        """
        return {}

    @classmethod
    def benchmark_hooks(cls) -> frozenset[str]:
        """The names of the benchmark hooks this class provides (overrides)."""
        return frozenset(name for name in BENCHMARK_HOOKS
                         if getattr(cls, name) is not getattr(BenchmarkHooks, name))
