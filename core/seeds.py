"""Deterministic seeds for private ``torch.Generator``s, derived from a seed and a few integers.

Variants that draw random numbers outside the global RNG (BigBird's random blocks per head,
additive's dropout masks per query chunk) seed a generator from a mix of integers. Python's
``hash()`` is salted per process, so it must not be used: this mix is the same in every process.
"""

from __future__ import annotations

__all__ = ["mix_seed"]

# Odd 64-bit constants (splitmix64 / murmur3 finalisers): multiplying by one is a bijection mod
# 2**64, so distinct inputs stay distinct before the final shifts spread every bit.
_ODD = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def mix_seed(seed: int, *values: int) -> int:
    """A generator seed in ``[0, 2**63)`` from ``seed`` and up to two more integers.

    The same arguments give the same seed in every process; neighbouring values (head 0 and 1,
    chunk 5 and 6) give unrelated ones. ``torch.Generator.manual_seed`` takes the result as is.
    """
    if len(values) > len(_ODD) - 1:
        raise ValueError(f"mix_seed takes a seed and at most {len(_ODD) - 1} values, got {len(values)}")
    x = seed * _ODD[0]
    for value, odd in zip(values, _ODD[1:], strict=False):
        x += (value + 1) * odd
    x &= _MASK
    x ^= x >> 31
    x = (x * _ODD[1]) & _MASK
    x ^= x >> 29
    return x & ((1 << 63) - 1)
