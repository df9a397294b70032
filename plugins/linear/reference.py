"""Textbook linear attention (Katharopoulos et al. 2020; Performer, Choromanski et al. 2021).

    phi_elu(x)   = elu(x) + 1 = exp(min(x, 0)) + max(x, 0)
    phi_relu(x)  = max(x, 0)
    phi_favor(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   x' = x * sqrt(scale)   (W: (m, E))

    A       = phi(Q) phi(K)^T, 0 where not allowed          (B, H, Lq, Lk)
    ref_i   = |phi(q_i)|_1 * sum_{j allowed} |phi(k_j)|_1      (rowsum(A) <= ref: the overlap is in [0, 1])
    weights = A / max(rowsum(A), eps * ref)                  (divisor 1 where both are 0)
    out     = weights @ V

``linear_reference`` is the float64 oracle of the tests; ``cumsum_linear_attention`` and
``quadratic_linear_attention`` are the naive formulations the benchmark times (input dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import Masks

__all__ = ["phi", "linear_reference", "cumsum_linear_attention", "quadratic_linear_attention"]


def phi(x: Tensor, feature_map: str, projection: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """Unstabilised feature map (B, H, L, E) -> (B, H, L, F)."""
    if feature_map == "elu":  # elu(x) + 1, without rounding exp(x) - 1 + 1 to 0 for x << 0
        return torch.exp(x.clamp(max=0.0)) + F.relu(x)
    if feature_map == "relu":
        return F.relu(x)
    assert projection is not None, "favor needs the projection (m, E)"
    xs = x * math.sqrt(scale)  # (B, H, L, E)
    arg = xs @ projection.to(x.dtype).T - 0.5 * (xs * xs).sum(-1, keepdim=True)  # (B, H, L, m)
    return torch.exp(arg) / math.sqrt(projection.shape[0])  # (B, H, L, m)


def _divisor(den: Tensor, ref: Tensor, eps: float) -> Tensor:
    """max(den, eps * ref), 1 where both are 0."""
    d = torch.where(den >= eps * ref, den, eps * ref)
    return torch.where(d == 0, torch.ones_like(d), d)


def linear_reference(
    query: Tensor, key: Tensor, value: Tensor | None, masks: Masks, feature_map: str,
    eps: float, projection: Tensor | None = None, scale: float = 1.0,
) -> tuple[Tensor | None, Tensor]:
    """(output (B, H, Lq, Ev) or None, weights (B, H, Lq, Lk)) in float64, O(Lq * Lk)."""
    q, k = query.double(), key.double()  # (B, H, L, E)
    pq, pk = phi(q, feature_map, projection, scale), phi(k, feature_map, projection, scale)
    scores = pq @ pk.mT  # (B, H, Lq, Lk)
    norms = pk.sum(-1)[..., None, :].expand_as(scores)  # (B, H, Lq, Lk): |phi(k_j)|_1
    allowed = masks.allowed(q.device)  # (B|1, H|1, Lq, Lk) or None
    if allowed is not None:
        scores = torch.where(allowed, scores, torch.zeros_like(scores))  # (B, H, Lq, Lk)
        norms = torch.where(allowed, norms, torch.zeros_like(norms))
    ref = pq.sum(-1, keepdim=True) * norms.sum(-1, keepdim=True)  # (B, H, Lq, 1)
    weights = scores / _divisor(scores.sum(-1, keepdim=True), ref, eps)  # (B, H, Lq, Lk)
    out = None if value is None else weights @ value.double()  # (B, H, Lq, Ev)
    return out, weights


def quadratic_linear_attention(
    query: Tensor, key: Tensor, value: Tensor, is_causal: bool, feature_map: str,
    eps: float, projection: Tensor | None = None, scale: float = 1.0,
) -> Tensor:
    """Naive dense formulation in the input dtype (benchmark baseline; no masks but causal)."""
    pq, pk = phi(query, feature_map, projection, scale), phi(key, feature_map, projection, scale)
    scores = pq @ pk.mT  # (B, H, Lq, Lk)
    norms = pk.sum(-1)[..., None, :].expand_as(scores)  # (B, H, Lq, Lk)
    if is_causal:
        scores, norms = scores.tril(), norms.tril()  # upper-left aligned like SDPA
    ref = pq.sum(-1, keepdim=True) * norms.sum(-1, keepdim=True)  # (B, H, Lq, 1)
    return (scores @ value) / _divisor(scores.sum(-1, keepdim=True), ref, eps)  # (B, H, Lq, Ev)


def cumsum_linear_attention(
    query: Tensor, key: Tensor, value: Tensor, is_causal: bool, feature_map: str,
    eps: float, projection: Tensor | None = None, scale: float = 1.0,
) -> Tensor:
    """Naive cumulative-sum formulation (benchmark baseline): materialises every prefix state
    S_i = sum_{j<=i} phi(k_j) v_j^T, memory (B, H, L, F, Ev). Needs Lq == Lk when causal."""
    pq = phi(query, feature_map, projection, scale)  # (B, H, Lq, F)
    pk = phi(key, feature_map, projection, scale)  # (B, H, Lk, F)
    if not is_causal:
        kv = torch.einsum("bhjf,bhjd->bhfd", pk, value)  # (B, H, F, Ev)
        num = torch.einsum("bhif,bhfd->bhid", pq, kv)  # (B, H, Lq, Ev)
        z = pk.sum(-2)  # (B, H, F)
        den = pq @ z[..., None]  # (B, H, Lq, 1)
        return num / _divisor(den, pq.sum(-1, keepdim=True) * z.sum(-1)[..., None, None], eps)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"cumsum baseline needs Lq == Lk when causal, got {query.shape[-2]} and {key.shape[-2]}"
        )
    kv = torch.cumsum(pk[..., :, None] * value[..., None, :], dim=2)  # (B, H, L, F, Ev)
    z = pk.cumsum(dim=2)  # (B, H, L, F)
    num = torch.einsum("bhif,bhifd->bhid", pq, kv)  # (B, H, L, Ev)
    den = (pq * z).sum(-1, keepdim=True)  # (B, H, L, 1)
    return num / _divisor(den, pq.sum(-1, keepdim=True) * z.sum(-1, keepdim=True), eps)
