"""Sigmoid attention straight from the paper's formula, float64 (Ramapuram et al. 2024, eq. 1):

    w_ij = sigmoid(scale * q_i . k_j + b)   (0 where masked),   b = -log(Lk) by default
    out  = w @ V
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnreg.core import Masks


def sigmoid_reference(query: Tensor, key: Tensor, value: Tensor | None, masks: Masks,
                      scale: float | None = None, bias: float | None = None) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)) in float64."""
    q, k = query.double(), key.double()
    s = scale if scale is not None else q.shape[-1] ** -0.5
    b = bias if bias is not None else -math.log(k.shape[2])
    logits = s * torch.einsum("bhqe,bhke->bhqk", q, k) + b  # (B, H, Lq, Lk)
    if masks.float_mask is not None:
        logits = logits + masks.float_mask.double()
    w = torch.sigmoid(logits)
    allowed = masks.allowed(q.device)
    if allowed is not None:
        w = torch.where(allowed, w, torch.zeros_like(w))
    out = None if value is None else torch.einsum("bhqk,bhkv->bhqv", w, value.double())
    return out, w
