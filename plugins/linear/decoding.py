"""Recurrent decoding state of linear attention: O(1) memory and time per token.

Causal linear attention is an RNN (Katharopoulos et al. 2020, sec. 3.4): the past enters every
later output only through

    S = sum_j phi(k_j) v_j^T   (F, Ev)        z = sum_j phi(k_j)   (F,)

over the real keys so far, so the state is these two sums, whatever the context length. A call
with T new positions continues the sequence: one chunk of the chunked algorithm started from the
state (``tril(phi_q phi_k^T) [v, 1] + phi_q [S, z]``; for T = 1 the plain recurrent update), or,
past ``chunk_size`` positions, the streamed kernel with the state as its initial prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import DecodeState, known

from .features import pointwise_features
from .kernels import linear_attention_step
from .segments import normalised, state_norm

__all__ = ["LinearState", "recurrent_step"]


@dataclass
class LinearState(DecodeState):
    """Decoding state of ``linear`` / ``performer``: ``kv = [S | z]`` and, for FAVOR+, the anchor
    of the key stabiliser. Its size depends on (B, H, F, Ev) only, never on ``length``.

    Buffers are in the accumulation dtype (float32 for half inputs). ``anchor`` is the largest
    FAVOR+ exponent of the first real key of each (batch, head), ``-inf`` until one arrives: the
    causal full forward subtracts exactly this constant from every key exponent, so decoding
    computes the very same features (see docs/variants/linear.md, *Decoding*).
    """

    feature_map: str = "elu"
    kv: Tensor | None = None  # (B, H, F, Ev + 1): [S | z] over the real keys so far
    anchor: Tensor | None = None  # (B, H), favor only

    @property
    def kv_sum(self) -> Tensor:
        """``S = sum_j phi(k_j) v_j^T`` (B, H, F, Ev) (a view)."""
        assert self.kv is not None
        return self.kv[..., :-1]

    @property
    def key_sum(self) -> Tensor:
        """``z = sum_j phi(k_j)`` (B, H, F) (a view)."""
        assert self.kv is not None
        return self.kv[..., -1]


def init_linear_state(
    batch: int, heads: int, head_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device,
    max_length: int | None, feature_map: str, features: int, acc: torch.dtype,
) -> LinearState:
    """An empty state: zero sums of ``features`` (F) rows, no FAVOR+ anchor yet."""
    kv = torch.zeros(batch, heads, features, value_dim + 1, dtype=acc, device=device)  # (B, H, F, Ev + 1)
    anchor = None
    if feature_map == "favor":
        anchor = torch.full((batch, heads), float("-inf"), dtype=acc, device=device)  # (B, H)
    return LinearState(batch, heads, head_dim, value_dim, dtype, device, max_length=max_length,
                       feature_map=feature_map, kv=kv, anchor=anchor)


def recurrent_step(
    query: Tensor, key: Tensor, value: Tensor, fmap: str, allowed: Tensor | None,
    eps: float, kv: Tensor, chunk: int, acc: torch.dtype, segment: int | None,
) -> tuple[Tensor, Tensor]:
    """Outputs (B, H, T, Ev) of T new positions and the new ``[S | z]`` (B, H, F, Ev + 1), in ``acc``.

    ``fmap`` as in ``kernels.linear_attention`` (``identity``: query / key already are features,
    0 on masked keys); ``allowed`` (B, 1, T, 1) marks real keys; ``eps`` is the relative floor of
    the normaliser (``|z_i|_1`` comes from the state: nothing but ``[S | z]`` is carried).
    Differentiable, also with respect to ``kv``, and twice.
    """
    t = query.shape[2]
    if t > chunk:  # a prefill: the streamed chunked kernel, started from the state
        return linear_attention_step(query, key, value, fmap, allowed, eps, kv, chunk, acc, segment)
    q, k = query.to(acc), key.to(acc)  # (B, H, T, E|F)
    if fmap == "identity":
        pq, pk = q, (k if allowed is None else k.masked_fill(~allowed, 0.0))  # (B, H, T, F)
    else:
        pq, pk = pointwise_features(q, fmap), pointwise_features(k, fmap, allowed)  # (B, H, T, F)
    v1 = F.pad(value.to(acc), (0, 1), value=1.0)  # (B, H, T, Ev + 1): the ones column gives z
    if allowed is not None:
        v1 = v1.masked_fill(~allowed, 0.0)  # padding (poisoned or not) never reaches the sums
    new = kv + pk.mT @ v1  # (B, H, F, Ev + 1)
    if t == 1:  # the query sees its own key
        return normalised(pq @ new, pq.sum(dim=-1, keepdim=True) * state_norm(new)[..., None, None], eps), new
    if not known(torch.isfinite(new).all(), on_meta=True):
        # A NaN / inf among the new keys or values: the kernel keeps it out of the rows before it
        # (0 * NaN in tril(scores) @ v1 would reach them), forward and backward.
        return linear_attention_step(query, key, value, fmap, allowed, eps, kv, chunk, acc, segment)
    nd = pq @ kv + (pq @ pk.mT).tril() @ v1  # (B, H, T, Ev + 1): one chunk after the prefix
    z = pk.sum(dim=-1, keepdim=True).cumsum(dim=2) + state_norm(kv)[..., None, None]  # (B, H, T, 1)
    return normalised(nd, pq.sum(dim=-1, keepdim=True) * z, eps), new
