"""Textbook additive attention (Bahdanau, Cho & Bengio 2015), naive broadcast form, float64.

Per head h, query i, key j:

    score[i, j] = scale * v_h . tanh(q_i W_q[h] + k_j W_k[h] + b[h])
    weights     = masked softmax over j (float mask added, empty rows -> 0)
    out         = weights @ V

It materialises the whole (B, H, Lq, Lk, d_a) tanh tensor: obviously correct, O(Lq*Lk*d_a) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnreg.core import Masks, softmax_attention_reference

__all__ = ["additive_logits", "additive_reference"]


def additive_logits(
    query: Tensor, key: Tensor, w_q: Tensor, w_k: Tensor, b: Tensor, v: Tensor, scale: float | None
) -> Tensor:
    """Scores (B, H, Lq, Lk) in the inputs' dtype; ``w_q, w_k (H, E, d_a)``, ``b, v (H, d_a)``."""
    qp = torch.einsum("bhie,hea->bhia", query, w_q) + b[None, :, None, :]  # (B, H, Lq, d_a)
    kp = torch.einsum("bhje,hea->bhja", key, w_k)  # (B, H, Lk, d_a)
    t = torch.tanh(qp[:, :, :, None, :] + kp[:, :, None, :, :])  # (B, H, Lq, Lk, d_a)
    scores = torch.einsum("bhija,ha->bhij", t, v)  # (B, H, Lq, Lk)
    return scores * (1.0 if scale is None else scale)


def additive_reference(
    query: Tensor, key: Tensor, value: Tensor | None, masks: Masks,
    w_q: Tensor, w_k: Tensor, b: Tensor, v: Tensor, scale: float | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)), both float64."""
    d = torch.float64
    logits = additive_logits(
        query.to(d), key.to(d), w_q.to(d), w_k.to(d), b.to(d), v.to(d), scale
    )  # (B, H, Lq, Lk)
    return softmax_attention_reference(logits, value, masks)
