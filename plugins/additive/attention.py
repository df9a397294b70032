"""Additive (Bahdanau) attention: config and module (fast path in ``chunked.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from attnreg.core import (
    SCALE_MAX,
    Attention,
    AttentionConfig,
    Capabilities,
    DecodeState,
    Masks,
    causal_mask,
    hits_under,
    masked_softmax,
    poison_rows,
    screen,
)

from .chunked import chunked_attention, chunked_scores
from .reference import additive_logits

__all__ = ["AdditiveAttention", "AdditiveConfig", "MAX_WEIGHT_ELEMENTS", "WORKSPACE_ELEMENTS"]

# Chosen by measurement (docs/variants/additive.md): the chunk's pairwise workspace
# (B*H*chunk*Lk*d_a elements) is what costs memory, while many small chunks cost time (each op
# is a parallel region; on a loaded 2-core machine 16-row chunks ran 4x slower than 64-row ones).
# 2**26 elements = 256 MB in fp32 gives 64-row chunks at B=1, H=8, Lk=2048, d_a=64.
WORKSPACE_ELEMENTS = 2**26
# Elements of each (H, E, d_a) weight a config may ask for: far above any practical additive layer
# (H=64, E=256, d_a=1024), low enough that a config cannot allocate gigabytes by a typo.
MAX_WEIGHT_ELEMENTS = 2**24


class AdditiveConfig(AttentionConfig):
    """Config of ``additive``: per-head Bahdanau scoring parameters and the query chunk size."""

    variant: Literal["additive"] = Field("additive", description="Variant name.")
    num_heads: int = Field(
        ge=1, le=4096, description="Number of heads H (one parameter set per head)."
    )
    head_dim: int = Field(
        ge=1, le=65536, description="Query/key head dimension E (input size of W_q, W_k)."
    )
    hidden_dim: int | None = Field(
        None, ge=1, le=65536, description="Size d_a of the additive hidden layer; None means head_dim."
    )
    chunk_size: int | None = Field(
        None, ge=1, le=2**31 - 1,
        description="Query rows per chunk of the fast path (peak memory ~ B*H*chunk_size*Lk*d_a floats); "
        "None picks the most rows whose workspace fits 2**26 elements (256 MB in fp32).",
    )
    scale: float | None = Field(
        None, gt=0.0, le=SCALE_MAX,
        description="Multiplier of the scores; None means 1 (Bahdanau's scores are not scaled). Finite.",
    )

    @model_validator(mode="after")
    def _bounded_parameters(self) -> AdditiveConfig:
        d_a = self.hidden_dim if self.hidden_dim is not None else self.head_dim
        elements = self.num_heads * self.head_dim * d_a
        if elements > MAX_WEIGHT_ELEMENTS:
            # A typo (head_dim=64000) would otherwise allocate gigabytes in the constructor.
            raise ValueError(
                f"num_heads * head_dim * hidden_dim = {self.num_heads} * {self.head_dim} * {d_a} = "
                f"{elements} elements in each of W_q and W_k exceeds the limit of 2**24 "
                f"({MAX_WEIGHT_ELEMENTS}, 64 MB in fp32); hidden_dim defaults to head_dim"
            )
        return self


class AdditiveAttention(Attention):
    """score[i, j] = scale * v_h . tanh(q_i W_q[h] + k_j W_k[h] + b[h]); softmax; @ V.

    Parameters (per head): ``w_q (H, E, d_a)``, ``w_k (H, E, d_a)``, ``b (H, d_a)``,
    ``v (H, d_a)``, initialised like ``nn.Linear`` (see ``reset_parameters``). Any float input
    dtype works: the math runs in the input dtype (float32 for half inputs) with the parameters
    cast to it, and the output has the input dtype.
    """

    variant = "additive"
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
        dropout=True, normalized=True, permutation_invariant=True, learnable=True, decoding=True,
        double_backward=True, complexity="O(Lq*Lk*d_a) time, O(chunk*Lk*d_a) memory",
    )

    def __init__(self, config: AdditiveConfig) -> None:
        super().__init__(config)
        h, e = config.num_heads, config.head_dim
        d_a = config.hidden_dim if config.hidden_dim is not None else e
        self.num_heads, self.head_dim, self.hidden_dim = h, e, d_a
        self.chunk_size = config.chunk_size
        self.w_q = nn.Parameter(torch.empty(h, e, d_a))  # (H, E, d_a)
        self.w_k = nn.Parameter(torch.empty(h, e, d_a))  # (H, E, d_a)
        self.b = nn.Parameter(torch.empty(h, d_a))  # (H, d_a)
        self.v = nn.Parameter(torch.empty(h, d_a))  # (H, d_a)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear`` init: W_q, W_k and b as ``nn.Linear(E, d_a)`` (weights and bias
        U(-1/sqrt(E), 1/sqrt(E))), v as ``nn.Linear(d_a, 1, bias=False)`` (U(-1/sqrt(d_a), 1/sqrt(d_a)))."""
        bound_e = 1.0 / math.sqrt(self.head_dim)
        bound_a = 1.0 / math.sqrt(self.hidden_dim)
        with torch.no_grad():
            self.w_q.uniform_(-bound_e, bound_e)
            self.w_k.uniform_(-bound_e, bound_e)
            self.b.uniform_(-bound_e, bound_e)
            self.v.uniform_(-bound_a, bound_a)

    def chunk_rows(self, batch: int, k_len: int) -> int:
        """Query rows per chunk: ``chunk_size``, or the most whose (B, H, rows, Lk, d_a) workspace
        fits ``WORKSPACE_ELEMENTS`` (at least 1)."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, WORKSPACE_ELEMENTS // (batch * self.num_heads * k_len * self.hidden_dim))

    @property
    def score_scale(self) -> float:
        """The configured ``scale``, or 1."""
        return 1.0 if self.scale is None else self.scale

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int,
                    dtype: torch.dtype, device: torch.device, max_length: int | None) -> DecodeState:
        if heads != self.num_heads or head_dim != self.head_dim:
            raise ValueError(f"init_state: heads={heads}, head_dim={head_dim} do not match this additive "
                             f"attention's parameters (num_heads={self.num_heads}, head_dim={self.head_dim})")
        return super()._init_state(batch, heads, head_dim, value_dim, dtype, device, max_length)

    def _check_sizes(self, query: Tensor) -> None:
        _, h, _, e = query.shape
        if h != self.num_heads or e != self.head_dim:
            raise ValueError(
                f"query shape {tuple(query.shape)} does not match this additive attention's "
                f"parameters: expected H = num_heads = {self.num_heads} and E = head_dim = {self.head_dim}"
            )

    def _project(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """(Q W_q + b, K W_k, v) in the compute dtype, and that dtype. Computed once per call."""
        acc = self._accum_dtype(query)
        w_q, w_k, b, v = (p.to(acc) for p in (self.w_q, self.w_k, self.b, self.v))
        qp = query.to(acc) @ w_q + b[None, :, None, :]  # (B, H, Lq, d_a): (B,H,Lq,E) @ (H,E,d_a)
        kp = key.to(acc) @ w_k  # (B, H, Lk, d_a)
        return qp, kp, v, acc

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        self._check_sizes(query)
        # A key hidden from some query: NaN/inf there must not leak (bad: (B, H, Lk) or None).
        key, value, bad = screen(key, value, masks)
        qp, kp, v, acc = self._project(query, key)
        chunk = self.chunk_rows(query.shape[0], key.shape[2])
        out = chunked_attention(
            qp, kp, v, value.to(acc), masks, self.score_scale, self.active_dropout, chunk
        )  # (B, H, Lq, Ev)
        return poison_rows(out, hits_under(bad, masks)).to(query.dtype)  # rows seeing NaN/inf: NaN

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        self._check_sizes(query)
        qp, kp, v, _ = self._project(query, key)
        chunk = self.chunk_rows(query.shape[0], key.shape[2])
        scores = chunked_scores(qp, kp, v, self.score_scale, chunk)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            scores = scores + masks.float_mask.to(scores.dtype)
        return masked_softmax(scores, masks.allowed(query.device)).to(query.dtype)

    def flops(
        self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
        is_causal: bool, q_offset: int = 0,
    ) -> float:
        """Useful forward FLOPs: projections 2*(Lq+Lk)*E*d_a, and per attended (i, j) pair
        4*d_a (add, tanh, multiply-add with v) + 2*Ev (weights @ V); causal pairs only.

        ``q_offset`` is ``Masks.q_offset``: 0 for upper-left causal, Lk - Lq for lower-right
        (a decode step or chunked prefill: query i sees keys j <= i + q_offset)."""
        d_a = self.hidden_dim
        if is_causal:  # row i sees clamp(i + q_offset + 1, 0, Lk) keys
            first = min(max(-q_offset, 0), q_len)  # rows before it see no key (Lq > Lk lower-right)
            full = min(max(k_len - q_offset - 1, first), q_len)  # rows from it on see every key
            # rows first .. full-1 see i + q_offset + 1 keys: an arithmetic series
            pairs = (full - first) * (first + full - 1 + 2 * (q_offset + 1)) // 2 + (q_len - full) * k_len
        else:
            pairs = q_len * k_len
        proj = 2.0 * (q_len + k_len) * head_dim * d_a
        return float(batch * heads * (proj + pairs * (4.0 * d_a + 2.0 * value_dim)))

    def benchmark_baselines(self) -> dict[str, Callable[[Tensor, Tensor, Tensor, bool], Tensor]]:
        """``naive``: the broadcast formula (whole (B, H, Lq, Lk, d_a) tanh tensor) in the input
        dtype, with this module's parameters; the same math as ``reference.py``."""

        def naive(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            d = query.dtype
            scores = additive_logits(
                query, key, self.w_q.to(d), self.w_k.to(d), self.b.to(d), self.v.to(d), self.scale
            )  # (B, H, Lq, Lk)
            allowed = causal_mask(query.shape[2], key.shape[2], query.device) if is_causal else None
            return masked_softmax(scores, allowed) @ value  # (B, H, Lq, Ev)

        return {"naive": naive}
