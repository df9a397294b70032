"""Feature maps of linear attention: elu+1, relu and Performer's FAVOR+ positive random features.

Every map turns queries and keys (B, H, L, E) into non-negative features (B, H, L, F) such that
``phi(q_i) . phi(k_j)`` is the (unnormalised) attention score. FAVOR+ features are returned
*stabilised*: ``exp(arg - c)`` with ``c`` a per-query-row maximum (queries) or a per-(batch, head)
constant (keys: the maximum over the real keys; causal: that of the first real key, which a
decoder can fix once and keep, see ``_key_stabiliser``). Such a positive rescaling cancels exactly
in the result, the normaliser's floor included: that floor is relative to the norms of the
features (``segments.py``), so no threshold has to be carried into stabilised units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import known

__all__ = ["FEATURE_MAPS", "FeaturePair", "favor_projection", "favor_args", "feature_pair",
           "pointwise_features"]

FEATURE_MAPS = ("elu", "relu", "favor")


def pointwise_features(x: Tensor, feature_map: str, allowed: Tensor | None = None) -> Tensor:
    """elu+1 or relu features of ``x`` (B, H, L, E); exactly 0 where ``allowed`` (B, 1, L, 1) is
    False, and the masked entries never reach the map (poisoned padding cannot make NaN).

    elu+1 is computed as ``max(min(exp(x), 1), x + 1)`` (= exp(x) for x <= 0, x + 1 above, since
    exp(x) >= x + 1), not ``elu(x) + 1``: the latter rounds ``exp(x) - 1 + 1`` to 0 below x = -16.6
    (float32; -36.7 in float64), so a query or key with only negative entries would lose its
    features altogether. About as fast as ``elu(x) + 1`` (measured in docs/variants/linear.md).
    """
    if allowed is not None:
        x = x.masked_fill(~allowed, 0.0)
    if feature_map == "relu":
        return F.relu(x)  # relu(0) = 0 on masked entries; nothing in place: autograd keeps the output
    if feature_map != "elu":
        raise ValueError(f"{feature_map!r} is not a pointwise feature map; expected 'elu' or 'relu'")
    if torch.is_grad_enabled() and x.requires_grad:  # exp's backward reads its result: no in-place op
        phi = torch.maximum(torch.exp(x).clamp(max=1.0), x + 1.0)
    else:  # contiguous buffers even for a strided slice: no copy needed afterwards
        phi = torch.exp(x, out=torch.empty(x.shape, dtype=x.dtype, device=x.device)).clamp_(max=1.0)
        torch.maximum(phi, torch.add(x, 1.0, out=torch.empty_like(phi)), out=phi)
    return phi.masked_fill_(~allowed, 0.0) if allowed is not None else phi


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
    """Features of one call (FAVOR+: stabilised; the result does not depend on the scale)."""

    phi_q: Tensor  # (B, H, Lq, F)
    phi_k: Tensor  # (B, H, Lk, F), exactly 0 on masked keys
    # favor, causal: the largest exponent of the first real key, (B, H, 1, 1); -inf where none.
    anchor: Tensor | None = None


def feature_pair(
    feature_map: str,
    query: Tensor,
    key: Tensor,
    key_allowed: Tensor | None,
    projection: Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
    anchor: Tensor | None = None,
) -> FeaturePair:
    """Compute the features of ``query`` (B, H, Lq, E) and ``key`` (B, H, Lk, E).

    ``key_allowed`` (B, 1, Lk, 1) bool marks real keys; masked keys get features 0 and no
    gradient, whatever they hold (poisoned padding cannot leak into the result or make NaN).
    ``is_causal`` picks a FAVOR+ key stabiliser that depends on no future key (see below);
    ``anchor`` (B, H, 1, 1), from an earlier call's ``FeaturePair.anchor``, continues a causal
    sequence whose earlier keys are not in ``key`` (decoding): where finite, it replaces the
    first real key of ``key``, so every call of a sequence uses the stabiliser of its full forward.
    """
    if feature_map == "favor":
        if key_allowed is not None:
            key = key.masked_fill(~key_allowed, 0.0)  # (B, H, Lk, E): padding values never reach math
        return _favor_pair(query, key, key_allowed, projection, scale, is_causal, anchor)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAPS}")
    phi_q = pointwise_features(query, feature_map)  # (B, H, Lq, E)
    return FeaturePair(phi_q, pointwise_features(key, feature_map, key_allowed))  # (B, H, Lk, E)


def _favor_pair(
    query: Tensor, key: Tensor, key_allowed: Tensor | None, projection: Tensor | None, scale: float,
    is_causal: bool, anchor: Tensor | None,
) -> FeaturePair:
    if projection is None:
        raise ValueError("feature_map 'favor' needs its projection matrix (m, E)")
    arg_q = favor_args(query, projection, scale)  # (B, H, Lq, m)
    arg_k = _key_args(key, projection, scale, is_causal)  # (B, H, Lk, m)
    if key_allowed is not None:
        arg_k = arg_k.masked_fill(~key_allowed, float("-inf"))  # exp -> 0 with zero gradient
    # Stabilisers are constants of the math (they cancel exactly), hence detached.
    c_q = arg_q.amax(dim=-1, keepdim=True).detach()  # (B, H, Lq, 1)
    c_k, first = _key_stabiliser(arg_k, key_allowed, projection, is_causal, anchor)  # (B, H, 1, 1) x2
    phi_q = torch.exp(arg_q - c_q)  # (B, H, Lq, m), max 1 per row
    phi_k = torch.exp(arg_k - c_k)  # (B, H, Lk, m)
    return FeaturePair(phi_q, phi_k, first)


def _key_args(key: Tensor, projection: Tensor, scale: float, is_causal: bool) -> Tensor:
    """``favor_args`` of the keys. Causal, a NaN / inf key may lie in the future of rows that must
    not feel it; its row's backward would turn their zero upstream gradient into 0 * NaN = NaN,
    so such rows pass no gradient at all (like padding: their forward value is kept as it is)."""
    ok = torch.isfinite(key).all(dim=-1, keepdim=True)  # (B, H, Lk, 1); padding is already 0 here
    if not is_causal or known(ok.all(), on_meta=True):
        return favor_args(key, projection, scale)
    clean = favor_args(key.masked_fill(~ok, 0.0), projection, scale)  # (B, H, Lk, m)
    return torch.where(ok, clean, favor_args(key.detach(), projection, scale))


# Largest exponent a key feature may get relative to the causal stabiliser: e^60 ~ 1e26 leaves
# float32 room for sums over ~1e10 keys * |v| without overflow.
_CAUSAL_HEADROOM = 60.0


def _key_stabiliser(
    arg_k: Tensor, key_allowed: Tensor | None, projection: Tensor, is_causal: bool,
    anchor: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One constant per (batch, head) subtracted from every key exponent (cancels exactly), and
    the causal anchor it came from (None when not causal).

    Non-causal: the maximum over real keys and features (all key features <= 1).
    Causal: the maximum must not depend on future keys, or outputs would change (in the last
    bits) when later tokens change. Every query that has a real key sees the FIRST real key, so
    its own maximum is a causal anchor (or ``anchor``, where finite: the first real key of earlier
    calls); it is raised to at least ``bound - 60``, where ``bound = max_r |w_r|^2 / 2`` bounds
    every exponent (w.x - |x|^2/2 <= |w|^2/2), so no key feature can exceed e^60.
    """
    arg_k = arg_k.detach()
    if not is_causal:
        c_k = arg_k.amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1), over real keys only
        return torch.where(torch.isfinite(c_k), c_k, torch.zeros_like(c_k)), None  # no real key at all
    b, h = arg_k.shape[:2]
    if key_allowed is None:
        first = arg_k[:, :, :1].amax(dim=-1, keepdim=True)  # (B, H, 1, 1)
    else:
        idx = key_allowed[:, 0, :, 0].to(torch.int8).argmax(dim=-1)  # (B,): first real key (0 if none)
        idx = idx[:, None, None, None].expand(b, h, 1, arg_k.shape[-1])  # (B, H, 1, m)
        first = arg_k.gather(2, idx).amax(dim=-1, keepdim=True)  # (B, H, 1, 1); -inf if none
    if anchor is not None:
        first = torch.where(torch.isfinite(anchor), anchor.to(first.dtype), first)  # (B, H, 1, 1)
    bound = 0.5 * projection.detach().square().sum(dim=-1).max()  # scalar
    return torch.maximum(first, bound - _CAUSAL_HEADROOM), first  # (B, H, 1, 1) finite, anchor
