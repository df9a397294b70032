"""The dtype a variant accumulates in."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accum_dtype"]


def accum_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The dtype to accumulate softmaxes, sums and normalisers in for inputs like ``x`` (a tensor
    or its dtype): float32 for float16 / bfloat16 (their few mantissa bits lose a long sum), the
    input dtype otherwise. Cast the result back to the input dtype at the end."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
