"""The floating dtypes attnreg knows, their names (``"bfloat16"``, ``"bf16"``), and the dtype a
variant accumulates in.

One home for what ``Capabilities.dtypes`` may hold, what the conformance suite iterates over,
and the names ``--dtype`` options, config files and reports use.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "accum_dtype", "dtype_name", "parse_dtype"]

# Most precise first: the order checks pick a reference dtype in.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
_ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
            "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def accum_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The dtype to accumulate softmaxes, sums and normalisers in for inputs like ``x`` (a tensor
    or its dtype): float32 for float16 / bfloat16 (their few mantissa bits lose a long sum), the
    input dtype otherwise. Cast the result back to the input dtype at the end."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... -> the torch dtype (ValueError naming the choices)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]
