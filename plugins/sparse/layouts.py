"""Block layouts: which key blocks each query block may attend to.

A layout is a bool tensor ``(H, nb, nb)``: ``layout[h, I, J]`` = query block I of head h may
attend to key block J, where ``nb = ceil(L / block_size)``. Builders here are pure functions of
their arguments (the random part of BigBird uses its own seeded ``torch.Generator``, never the
global RNG), so the same config and length give the same layout in every call and process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnreg.core import mix_seed

__all__ = [
    "bigbird_layout",
    "strided_layout",
    "fixed_layout",
    "default_stride",
    "expand_layout",
    "head_seed",
]

def head_seed(seed: int, head: int, length: int) -> int:
    """Deterministic generator seed of one head's random blocks (same in every process)."""
    return mix_seed(seed, head, length)


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


def expand_layout(layout: Tensor, block_size: int, length: int) -> Tensor:
    """Dense token mask ``(H, L, L)`` of a block layout ``(H, nb, nb)`` (last block may be partial)."""
    dense = layout.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return dense[:, :length, :length]  # (H, L, L)
