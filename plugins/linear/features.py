"""Feature maps of linear attention: elu+1, relu and Performer's FAVOR+ positive random features.

Every map turns queries and keys (B, H, L, E) into non-negative features (B, H, L, F) such that
``phi(q_i) . phi(k_j)`` is the (unnormalised) attention score. FAVOR+ features are returned
*stabilised*: ``exp(arg - c)`` with ``c`` a per-query-row maximum (queries) or a per-(batch, head)
maximum over the real keys (keys). Such a positive rescaling cancels in ``num / den``; the
threshold ``thr`` of the normaliser is rescaled by the same factor so that the result equals the
unstabilised formula ``num / max(den, eps)`` exactly (see ``FeaturePair``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FEATURE_MAPS", "FeaturePair", "favor_projection", "favor_args", "feature_pair"]

FEATURE_MAPS = ("elu", "relu", "favor")


def favor_projection(num_features: int, head_dim: int, seed: int) -> Tensor:
    """FAVOR+ projection ``W`` (m, E), float64 on CPU, a pure function of its arguments.

    Blocks of E orthonormal rows (QR of a Gaussian matrix, signs fixed by diag(R) so the draw is
    Haar and unique), each row rescaled by the norm of an independent N(0, I_E) vector so that
    rows are marginally Gaussian (Choromanski et al. 2021, "positive orthogonal random features").
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)  # (E, E)
        q, r = torch.linalg.qr(gauss)  # (E, E), (E, E)
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)[None, :]
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks, dim=0)[:num_features]  # (m, E)
    norms = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=1)  # (m,)
    return rows * norms[:, None]  # (m, E)


def favor_args(x: Tensor, projection: Tensor, scale: float) -> Tensor:
    """Exponent of the FAVOR+ features: ``w_r . x' - |x'|^2 / 2`` with ``x' = x * sqrt(scale)``.

    ``exp`` of it, divided by sqrt(m), is the feature map; ``E[phi(q) . phi(k)] = exp(scale q.k)``.
    """
    xs = x * math.sqrt(scale)  # (B, H, L, E)
    return xs @ projection.T - 0.5 * (xs * xs).sum(dim=-1, keepdim=True)  # (B, H, L, m)


@dataclass(frozen=True)
class FeaturePair:
    """Features of one call and the normaliser threshold.

    ``out = (phi_q phi_k^T V) / max(phi_q phi_k^T 1, thr)``; ``thr`` is ``eps`` (float) for
    elu/relu and a (B, H, Lq, 1) tensor for favor (eps expressed in stabilised units).
    """

    phi_q: Tensor  # (B, H, Lq, F)
    phi_k: Tensor  # (B, H, Lk, F), exactly 0 on masked keys
    thr: float | Tensor


def feature_pair(
    feature_map: str,
    query: Tensor,
    key: Tensor,
    key_allowed: Tensor | None,
    eps: float,
    projection: Tensor | None = None,
    scale: float = 1.0,
) -> FeaturePair:
    """Compute the features of ``query`` (B, H, Lq, E) and ``key`` (B, H, Lk, E).

    ``key_allowed`` (B, 1, Lk, 1) bool marks real keys; masked keys get features 0 and no
    gradient, whatever they hold (poisoned padding cannot leak into the result or make NaN).
    """
    if key_allowed is not None:
        key = key.masked_fill(~key_allowed, 0.0)  # (B, H, Lk, E): padding values never reach math
    if feature_map == "elu":
        phi_q, phi_k = F.elu(query).add_(1.0), F.elu(key).add_(1.0)  # (B, H, L, E)
    elif feature_map == "relu":
        phi_q, phi_k = F.relu(query), F.relu(key)  # (B, H, L, E)
    elif feature_map == "favor":
        return _favor_pair(query, key, key_allowed, eps, projection, scale)
    else:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAPS}")
    if key_allowed is not None:
        phi_k = phi_k.masked_fill(~key_allowed, 0.0)  # (B, H, Lk, E)
    return FeaturePair(phi_q, phi_k, eps)


def _favor_pair(
    query: Tensor, key: Tensor, key_allowed: Tensor | None, eps: float,
    projection: Tensor | None, scale: float,
) -> FeaturePair:
    if projection is None:
        raise ValueError("feature_map 'favor' needs its projection matrix (m, E)")
    m = projection.shape[0]
    arg_q = favor_args(query, projection, scale)  # (B, H, Lq, m)
    arg_k = favor_args(key, projection, scale)  # (B, H, Lk, m)
    if key_allowed is not None:
        arg_k = arg_k.masked_fill(~key_allowed, float("-inf"))  # exp -> 0 with zero gradient
    # Stabilisers are constants of the math (they cancel exactly), hence detached.
    c_q = arg_q.amax(dim=-1, keepdim=True).detach()  # (B, H, Lq, 1)
    c_k = arg_k.amax(dim=(-2, -1), keepdim=True).detach()  # (B, H, 1, 1), over real keys only
    c_k = torch.where(torch.isfinite(c_k), c_k, torch.zeros_like(c_k))  # no real key at all
    phi_q = torch.exp(arg_q - c_q)  # (B, H, Lq, m), max 1 per row
    phi_k = torch.exp(arg_k - c_k)  # (B, H, Lk, m), max 1 per (B, H)
    # True features are exp(arg) / sqrt(m): den_true = den * exp(c_q + c_k) / m, so
    # max(den_true, eps) corresponds to max(den, eps * m * exp(-c_q - c_k)) here.
    log_thr = math.log(eps * m) - c_q - c_k  # (B, H, Lq, 1)
    thr = torch.exp(log_thr).clamp_min(torch.finfo(arg_q.dtype).tiny)  # (B, H, Lq, 1), > 0
    return FeaturePair(phi_q, phi_k, thr)
