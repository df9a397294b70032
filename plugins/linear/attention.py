"""Linear attention (Katharopoulos et al. 2020) with elu+1, relu and FAVOR+ (Performer) features.

    out_i = phi(q_i)^T S_i / max(phi(q_i)^T z_i, eps * |phi(q_i)|_1 * |z_i|_1)
    S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

over the allowed keys j (real keys; j <= i when causal, j <= i + Lk - Lq when lower-right). The
floor is relative (``den / (|phi(q_i)|_1 |z_i|_1)`` is the row's overlap, in [0, 1]), so rows are
normalised whatever the scale of the features.
Non-causal: two matmuls; causal: the chunked prefix-state algorithm; both stream over the
sequence (``kernels.py``). Decoding keeps the recurrent state [S | z] (``decoding.py``): O(1)
memory and time per token. Half inputs are computed in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from attnreg.core import (
    SCALE_MAX,
    Attention,
    AttentionConfig,
    Capabilities,
    DecodeState,
    LRUCache,
    Masks,
    tensor_nbytes,
)
from attnreg.core.parallel import ShardContext

from .decoding import LinearState, init_linear_state, recurrent_step
from .distributed import linear_sharded
from .features import FeaturePair, favor_projection, feature_pair
from .kernels import linear_attention, linear_weights

__all__ = ["LinearAttention", "LinearConfig", "PerformerAttention", "PerformerConfig"]


class _LinearFields(AttentionConfig):
    """Fields shared by ``linear`` and ``performer``."""

    scale: float | None = Field(
        None, gt=0.0, le=SCALE_MAX,
        description="feature_map='favor' only: x' = x * sqrt(scale), so the features approximate "
        "softmax(scale * q.k); None = 1/sqrt(E). Must stay unset for elu / relu (no logit scale).",
    )
    num_features: int = Field(
        256, ge=1, le=65536,
        description="m, the number of FAVOR+ random features (feature_map='favor' only).",
    )
    eps: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Relative floor of the normaliser: out_i = num_i / max(den_i, eps * "
        "|phi(q_i)|_1 * |z_i|_1), z_i = the sum of the features of the keys row i sees. "
        "den_i / (|phi(q_i)|_1 |z_i|_1) is the row's overlap in [0, 1], so the floor does not "
        "depend on the scale of the features: a row is normalised exactly unless its overlap is "
        "below eps (then it is damped, num / floor, continuously to 0); a row with nothing to "
        "attend (den 0) gives 0. None = 1e-6 for relu (a query can have no overlap: eps bounds "
        "the gradient near it), 1e-20 for elu and favor (strictly positive features; FAVOR+ "
        "overlaps reach 1e-17 at q, k ~ N(0, 16)).",
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1,
        description="Seed of the FAVOR+ random features: the same config gives the same features.",
    )
    chunk_size: int = Field(
        128, ge=1, le=65536,
        description="Chunk length of the causal algorithm (quadratic inside a chunk, prefix "
        "state across chunks). 128 measured fastest on CPU for E=64.",
    )
    segment_size: int | None = Field(
        None, ge=1, le=2**31 - 1,
        description="Positions processed per pass (rounded up to whole chunks): the computation "
        "streams over the sequence so its working set stays in cache. None = about 1 MB per "
        "tensor (2048 positions for B*H=8, E=64). Affects speed and memory only (results agree "
        "to rounding).",
    )

    @model_validator(mode="after")
    def _scale_only_for_favor(self) -> _LinearFields:
        fmap = getattr(self, "feature_map", None)
        if self.scale is not None and fmap != "favor":
            raise ValueError(
                f"scale={self.scale} only applies to feature_map='favor' (x' = x * sqrt(scale), "
                f"approximating softmax(scale * q.k)); feature_map='{fmap}' uses no logit scale, "
                "leave scale unset"
            )
        return self


class LinearConfig(_LinearFields):
    """Config of ``linear`` (alias ``linear_attention``)."""

    variant: Literal["linear"] = Field("linear", description="Variant name.")
    feature_map: Literal["elu", "relu", "favor"] = Field(
        "elu",
        description="phi: 'elu' = elu(x)+1 (Katharopoulos 2020), 'relu' = max(x, 0), 'favor' = "
        "Performer FAVOR+ positive orthogonal random features approximating softmax.",
    )


class PerformerConfig(_LinearFields):
    """Config of ``performer``: linear attention with FAVOR+ features (the only map it allows)."""

    variant: Literal["performer"] = Field("performer", description="Variant name.")
    feature_map: Literal["favor"] = Field(
        "favor", description="Always 'favor' (use variant 'linear' for elu / relu)."
    )


# FAVOR+ projections, float64 on CPU, keyed by (seed, num_features, E): drawing one takes
# ceil(m / E) QRs of (E, E) Gaussians, a large fraction of a forward at L=512 (30 ms vs 110 ms for
# m=256, E=64 on the 2-core CPU), so they are memoised here instead of per call. Process-wide but
# bounded (8 entries, 32 MB); never attached to a module, so forward mutates nothing.
_PROJ_ENTRIES = 8
_PROJ_MAX_BYTES = 32 << 20
_projections: LRUCache[Tensor] = LRUCache(_PROJ_ENTRIES, _PROJ_MAX_BYTES, tensor_nbytes)


def cached_favor_projection(num_features: int, head_dim: int, seed: int) -> Tensor:
    """``favor_projection(num_features, head_dim, seed)`` (m, E) float64 CPU, memoised (bounded).

    The returned tensor is shared: do not modify it in place.
    """
    # (m, E); deterministic, so two threads building it at once is harmless
    return _projections.get_or_build((seed, num_features, head_dim),
                                     lambda: favor_projection(num_features, head_dim, seed))


# Default relative floors (see the eps field): relu can have zero overlap, elu and favor cannot.
_DEFAULT_EPS = {"relu": 1e-6, "elu": 1e-20, "favor": 1e-20}

_CAPS = dict(
    causal=True, key_mask=True, attn_mask=False, float_mask=False, cross_attention=True,
    dropout=False, normalized=True, permutation_invariant=True, learnable=False, decoding=True,
    context_parallel=True, double_backward=True,
)


class LinearAttention(Attention):
    """Linear attention; see the module docstring. ``attention_weights`` is the dense (O(L^2))
    normalised matrix of the same computation."""

    variant = "linear"
    capabilities = Capabilities(**_CAPS, complexity="O(L*F*Ev), F = E (elu, relu) or m (favor)")

    config: LinearConfig | PerformerConfig

    def __init__(self, config: LinearConfig | PerformerConfig) -> None:
        super().__init__(config)
        self.feature_map = config.feature_map
        self.eps = config.eps if config.eps is not None else _DEFAULT_EPS[config.feature_map]
        self.chunk_size = config.chunk_size

    # -- FAVOR+ projection: a pure function of (seed, m, E, dtype, device) ----------------------
    def projection(self, head_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """FAVOR+ projection (m, E) for this head dim, in ``dtype`` on ``device`` (a fresh tensor).

        A pure function of (seed, num_features, E): drawn in float64 on the CPU (bounded
        process-wide memo, ``cached_favor_projection``) and converted per call. The module holds
        no copy: nothing in ``state_dict`` or ``named_buffers``, and forward never mutates it.
        """
        cpu = cached_favor_projection(self.config.num_features, head_dim, self.config.seed)  # (m, E)
        return cpu.to(device=device, dtype=dtype, copy=True)  # (m, E); copy: the memo stays intact

    def _features(self, query: Tensor, key: Tensor, key_mask: Tensor | None, is_causal: bool,
                  anchor: Tensor | None = None) -> FeaturePair:
        """Features in the accumulation dtype (float32 for half inputs); ``anchor`` continues a
        causal FAVOR+ sequence (decoding, see ``feature_pair``)."""
        acc = self._accum_dtype(query)
        q, k = query.to(acc), key.to(acc)  # (B, H, L, E)
        allowed = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, Lk, 1)
        proj, scale = None, 1.0
        if self.feature_map == "favor":
            e = query.shape[-1]
            proj = self.projection(e, query.device, acc)  # (m, E)
            scale = self.softmax_scale(e)
        return feature_pair(self.feature_map, q, k, allowed, proj, scale, is_causal, anchor)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        allowed = None if masks.key_mask is None else masks.key_mask[:, None, :, None]  # (B, 1, Lk, 1)
        q, k, fmap = query, key, self.feature_map  # elu / relu: applied inside, per segment
        if self.feature_map == "favor":  # its key stabiliser needs every key first: features up front
            fp = self._features(query, key, masks.key_mask, masks.is_causal)
            q, k, fmap = fp.phi_q, fp.phi_k, "identity"
        out = linear_attention(q, k, value, fmap, allowed, self.eps, masks.is_causal, self.chunk_size,
                               self._accum_dtype(query), self.config.segment_size,
                               masks.q_offset)  # (B, H, Lq, Ev)
        return out.to(query.dtype)

    def _attend_sharded(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
                        ctx: ShardContext) -> Tensor:
        # Only the key sums [S | z] travel: all-reduce or chunk prefix (distributed.py).
        return linear_sharded(self, query, key, value, masks, ctx)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        fp = self._features(query, key, masks.key_mask, masks.is_causal)
        return linear_weights(fp.phi_q, fp.phi_k, self.eps, masks.is_causal, masks.q_offset).to(query.dtype)

    # -- incremental decoding: the recurrent state [S | z] (decoding.py) -----------------------------
    def _num_features(self, head_dim: int) -> int:
        """F, the feature dimension: ``num_features`` for FAVOR+, E for elu / relu."""
        return self.config.num_features if self.feature_map == "favor" else head_dim

    def _state_fingerprint(self) -> dict[str, Any]:
        # What the sums S, z are sums of: phi, and for FAVOR+ its random projection and scale.
        if self.feature_map != "favor":
            return {"feature_map": self.feature_map}
        cfg = self.config
        return {"feature_map": "favor", "num_features": cfg.num_features, "seed": cfg.seed,
                "scale": cfg.scale}

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int,
                    dtype: torch.dtype, device: torch.device, max_length: int | None) -> LinearState:
        return init_linear_state(batch, heads, head_dim, value_dim, dtype, device, max_length,
                                 self.feature_map, self._num_features(head_dim), self._accum_dtype(dtype))

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, LinearState]:
        if not isinstance(state, LinearState) or state.kv is None:
            raise ValueError(f"decode: {self.variant} needs the state of its own init_state, got a "
                             f"{type(state).__name__}")
        allowed = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, T, 1)
        q, k, fmap, anchor = query, key, self.feature_map, state.anchor
        if self.feature_map == "favor":  # the stabiliser of the full forward: the first real key's
            assert state.anchor is not None
            fp = self._features(query, key, key_mask, True, state.anchor[:, :, None, None])
            q, k, fmap = fp.phi_q, fp.phi_k, "identity"
            assert fp.anchor is not None
            anchor = fp.anchor[:, :, 0, 0]  # (B, H): fixed once a real key has been seen
        out, kv = recurrent_step(q, k, value, fmap, allowed, self.eps, state.kv, self.chunk_size,
                                 self._accum_dtype(query), self.config.segment_size)  # (B, H, T, Ev)
        new = dataclasses.replace(state, kv=kv, anchor=anchor, length=state.length + query.shape[2])
        return out.to(query.dtype), new

    # -- benchmark harness hooks -------------------------------------------------------------------
    def flops(
        self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
        is_causal: bool,
    ) -> float:
        """Forward FLOPs of the algorithm run (multiply-add = 2): feature maps, states, readout.

        Causal adds the intra-chunk quadratic form (full C x C blocks, as computed).
        """
        feat = self._num_features(head_dim)
        f = 0.0
        if self.feature_map == "favor":
            f += 2.0 * (q_len + k_len) * head_dim * feat  # x' W^T
        ev1 = value_dim + 1  # the normaliser column
        if not is_causal:
            f += 2.0 * k_len * feat * ev1 + 2.0 * q_len * feat * ev1
        else:
            n = min(q_len, k_len)
            c = min(self.chunk_size, n)
            f += 2.0 * n * feat * ev1 * 2  # chunk states + prefix readout
            f += 2.0 * n * c * (feat + ev1)  # intra-chunk scores and scores @ V
            f += 2.0 * (q_len - n) * feat * ev1 + (2.0 * k_len * feat * ev1 if q_len > k_len else 0.0)
        return batch * heads * f

    def benchmark_baselines(self) -> dict[str, Callable[[Tensor, Tensor, Tensor, bool], Tensor]]:
        """Naive formulations to time against the fast path, run in the input dtype:

        - ``cumsum``: the cumulative-sum formulation (materialises every prefix state,
          (B, H, L, F, Ev) memory) for causal; the plain sums for non-causal.
        - ``quadratic``: dense phi(Q) phi(K)^T (O(L^2) memory).
        """
        from .reference import cumsum_linear_attention, quadratic_linear_attention

        def _proj(q: Tensor) -> Tensor | None:
            if self.feature_map != "favor":
                return None
            return self.projection(q.shape[-1], q.device, q.dtype)

        def cumsum(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            return cumsum_linear_attention(
                query, key, value, is_causal, self.feature_map, self.eps, _proj(query),
                self._favor_scale(query),
            )

        def quadratic(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            return quadratic_linear_attention(
                query, key, value, is_causal, self.feature_map, self.eps, _proj(query),
                self._favor_scale(query),
            )

        return {"cumsum": cumsum, "quadratic": quadratic}

    def _favor_scale(self, query: Tensor) -> float:
        return self.softmax_scale(query.shape[-1]) if self.feature_map == "favor" else 1.0


class PerformerAttention(LinearAttention):
    """Performer (Choromanski et al. 2021): linear attention with FAVOR+ features, an unbiased
    approximation of softmax(scale * Q K^T) V."""

    variant = "performer"
    capabilities = Capabilities(
        **_CAPS, complexity="O(L*m*(E+Ev))", approximates="dot_product"
    )
