"""Block layouts: which key blocks each query block may attend to.

A layout is a bool tensor ``(H, nb, nb)``: ``layout[h, I, J]`` = query block I of head h may
attend to key block J, where ``nb = ceil(L / block_size)``. Builders here are pure functions of
their arguments (the random part of BigBird uses its own seeded ``torch.Generator``, never the
global RNG), so the same config and length give the same layout in every call and process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "bigbird_layout",
    "strided_layout",
    "fixed_layout",
    "default_stride",
    "custom_layout_tensor",
    "parse_custom_layout",
    "expand_layout",
    "head_seed",
]

# Odd 64-bit mixing constants (splitmix/murmur finalisers): a stable, process-independent mix of
# (seed, head, length) -- Python's hash() is salted per process, so it must not be used here.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def head_seed(seed: int, head: int, length: int) -> int:
    """Deterministic generator seed of one head's random blocks (same in every process)."""
    x = (seed * _MIX[0] + (head + 1) * _MIX[1] + (length + 1) * _MIX[2]) % (1 << 64)
    x ^= x >> 31
    x = (x * _MIX[1]) % (1 << 64)
    x ^= x >> 29
    return x % (1 << 63)  # torch.Generator.manual_seed takes a non-negative int64


def _band(nb: int, lo: int, hi: int) -> Tensor:
    """(nb, nb) bool: True where -lo <= J - I <= hi."""
    d = torch.arange(nb)[None, :] - torch.arange(nb)[:, None]  # (nb, nb) = J - I
    return (d >= -lo) & (d <= hi)


def bigbird_layout(
    nb: int, heads: int, *, window: int, num_global: int, num_random: int, seed: int, length: int
) -> Tensor:
    """BigBird (Zaheer et al. 2020) block layout ``(heads, nb, nb)``.

    - window: each query block sees the ``window`` blocks centred on it (``window`` is odd);
    - global: the first ``num_global`` blocks see every block and are seen by every block;
    - random: each other query block sees ``num_random`` more key blocks, drawn without
      replacement among the blocks not already in its window or global set (fewer when not
      enough remain), from a generator seeded by ``head_seed(seed, h, length)``.
    """
    half = window // 2
    base = _band(nb, half, half)  # (nb, nb) sliding window of blocks
    g = min(num_global, nb)
    base[:g, :] = True  # global rows
    base[:, :g] = True  # global columns
    layout = base.expand(heads, nb, nb).clone()  # (H, nb, nb)
    k = min(num_random, nb)
    if k == 0:
        return layout
    gen = torch.Generator(device="cpu")
    for h in range(heads):
        gen.manual_seed(head_seed(seed, h, length))
        score = torch.rand(nb, nb, generator=gen)  # (nb, nb) uniform keys -> random subset
        score = score.masked_fill(base, math.inf)  # only blocks not yet attended are candidates
        pick_score, pick = score.topk(k, dim=-1, largest=False)  # (nb, k) the k smallest per row
        chosen = torch.zeros(nb, nb, dtype=torch.bool)
        chosen.scatter_(1, pick, torch.isfinite(pick_score))  # rows with < k candidates get fewer
        chosen[:g] = False  # global rows are already full
        layout[h] |= chosen
    return layout


def default_stride(nb: int) -> int:
    """Child et al.'s choice l ~ sqrt(n), in blocks: ceil(sqrt(nb)) (at least 1)."""
    return max(1, math.isqrt(nb - 1) + 1) if nb > 1 else 1


def strided_layout(nb: int, heads: int, *, stride: int) -> Tensor:
    """Strided pattern (Child et al. 2019, eq. for A(1) and A(2)) in block form ``(heads, nb, nb)``.

    A(1): |I - J| < stride (the previous/next ``stride`` blocks); A(2): (I - J) mod stride == 0.
    The union of both ("merged head"); its causal part (J <= I) is the paper's causal pattern.
    """
    d = torch.arange(nb)[:, None] - torch.arange(nb)[None, :]  # (nb, nb) = I - J
    layout = (d.abs() < stride) | (d.remainder(stride) == 0)  # (nb, nb)
    return layout.expand(heads, nb, nb).clone()


def fixed_layout(nb: int, heads: int, *, stride: int, c: int) -> Tensor:
    """Fixed pattern (Child et al. 2019) in block form ``(heads, nb, nb)``.

    A(1): floor(J / l) == floor(I / l) (same chunk of ``l = stride`` blocks);
    A(2): J mod l in {l - c, ..., l - 1} (the last ``c`` blocks of every chunk are summaries).
    """
    if c > stride:
        raise ValueError(f"fixed layout: c={c} summary blocks exceed the stride l={stride} blocks")
    i = torch.arange(nb)
    same_chunk = (i[:, None] // stride) == (i[None, :] // stride)  # (nb, nb) A(1)
    summary = (i % stride >= stride - c)[None, :].expand(nb, nb)  # (nb, nb) A(2)
    return (same_chunk | summary).expand(heads, nb, nb).clone()


def custom_layout_tensor(spec: Sequence, heads: int | None = None) -> Tensor:
    """A validated custom layout (``parse_custom_layout``'s output) as a ``(H|1, nb, nb)`` tensor."""
    kind, data = spec[0], spec[1]
    if kind == "pairs":
        nb = 1 + max(q for q, _ in data)
        layout = torch.zeros(1, nb, nb, dtype=torch.bool)
        for q, k in data:
            layout[0, q, k] = True
        return layout
    t = torch.tensor(data, dtype=torch.bool)
    return t if t.dim() == 3 else t[None]  # (H|1, nb, nb)


def _all_leaves(obj: object, kind: type) -> bool:
    if isinstance(obj, (list, tuple)):
        return all(_all_leaves(x, kind) for x in obj)
    return isinstance(obj, kind) and (kind is bool or not isinstance(obj, bool))


def _depth(obj: object) -> int:
    d = 0
    while isinstance(obj, (list, tuple)) and obj:
        obj, d = obj[0], d + 1
    return d


def parse_custom_layout(value: object) -> tuple[str, list]:
    """Validate a custom layout given as pairs, a nested bool list, or a bool tensor.

    Returns ``("pairs", [[q, k], ...])`` or ``("matrix", nested bool list (nb, nb) or (H, nb, nb))``.
    Raises ``ValueError`` naming what is wrong: out-of-range block, empty row, ragged matrix.
    """
    if isinstance(value, Tensor):
        if value.dtype != torch.bool:
            raise ValueError(f"custom_layout tensor must be bool (H, nb, nb) or (nb, nb), got {value.dtype}")
        value = value.detach().cpu().tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            "custom_layout must be a non-empty list of [query_block, key_block] pairs, a nested "
            f"bool list (nb, nb) / (H, nb, nb), or a bool tensor; got {value!r}"
        )
    if _all_leaves(value, bool):
        return "matrix", _check_matrix(value)
    if _all_leaves(value, int) and _depth(value) == 2 and all(len(p) == 2 for p in value):
        return "pairs", _check_pairs(value)
    raise ValueError(
        "custom_layout: expected [query_block, key_block] integer pairs or a nested list of "
        "true/false (a 0/1 integer matrix is not accepted: use true/false); got "
        f"{str(value)[:80]}"
    )


def _check_pairs(pairs: Sequence[Sequence[int]]) -> list:
    out = [[int(q), int(k)] for q, k in pairs]
    bad = [p for p in out if p[0] < 0 or p[1] < 0]
    if bad:
        raise ValueError(f"custom_layout pairs must be non-negative block indices, got {bad[:5]}")
    nb = 1 + max(q for q, _ in out)  # every row must be present, so the last row fixes nb
    far = [p for p in out if p[1] >= nb]
    if far:
        raise ValueError(
            f"custom_layout pair(s) {far[:5]} have key_block out of range: the query blocks "
            f"0..{nb - 1} give nb={nb} blocks, so key blocks must be in 0..{nb - 1}"
        )
    empty = sorted(set(range(nb)) - {q for q, _ in out})
    if empty:
        raise ValueError(
            f"custom_layout: query block(s) {empty[:10]} attend to nothing; every query block "
            f"0..{nb - 1} needs at least one [query_block, key_block] pair"
        )
    return sorted({(q, k) for q, k in out})  # type: ignore[return-value]


def _check_matrix(m: Sequence) -> list:
    t_depth = _depth(m)
    if t_depth not in (2, 3):
        raise ValueError(f"custom_layout bool list must be (nb, nb) or (H, nb, nb), got depth {t_depth}")
    try:
        t = torch.tensor(m, dtype=torch.bool)
    except (ValueError, TypeError) as err:
        raise ValueError(f"custom_layout bool list is ragged (rows of different lengths): {err}") from None
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"custom_layout must be square (nb, nb) per head, got shape {tuple(t.shape)}")
    rows = t.any(dim=-1)  # (H|., nb)
    if not bool(rows.all()):
        empty = (~rows).nonzero().tolist()
        raise ValueError(
            f"custom_layout: row(s) {empty[:10]} (as [head, query_block] or [query_block]) allow no "
            "key block; every query block needs at least one True"
        )
    return t.tolist()


def expand_layout(layout: Tensor, block_size: int, length: int) -> Tensor:
    """Dense token mask ``(H, L, L)`` of a block layout ``(H, nb, nb)`` (last block may be partial)."""
    dense = layout.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return dense[:, :length, :length]  # (H, L, L)
