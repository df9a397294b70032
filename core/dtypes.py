"""The floating dtypes attnreg knows, and their names (``"bfloat16"``, ``"bf16"``).

One home for what ``Capabilities.dtypes`` may hold, what the conformance suite iterates over,
and the names ``--dtype`` options, config files and reports use.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "dtype_name", "parse_dtype"]

# Most precise first: the order checks pick a reference dtype in.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
_ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
            "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... -> the torch dtype (ValueError naming the choices)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]
