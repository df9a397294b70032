"""Block-sparse softmax attention: only the active (query block, key block) pairs are computed."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import Attention, Capabilities, Masks, dot_product_logits, masked_softmax

from .config import BigBirdConfig, SparseConfig
from .layouts import (
    bigbird_layout,
    custom_layout_tensor,
    default_stride,
    expand_layout,
    fixed_layout,
    parse_custom_layout,
    strided_layout,
)
from .plan import Group, Plan, make_plan

__all__ = ["SparseAttention", "BigBirdAttention"]

_CACHE_SIZE = 16  # layouts / plans kept per module (one per length, heads, causal, device)


class SparseAttention(Attention):
    """Exact softmax attention restricted to a block layout (bigbird, strided, fixed, custom).

    ``forward`` equals dense softmax attention with ``pattern_mask(L)`` ANDed with the call's
    masks, but gathers only the active key/value blocks of every query block: time and memory
    O(L * active_blocks * block_size * E). Under ``is_causal`` the causal part of the layout is used.
    """

    variant = "sparse"
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=False,
        dropout=True, normalized=True, permutation_invariant=False, learnable=False,
        complexity="O(L*k*b*E), k = active key blocks per query block, b = block_size",
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self.config: SparseConfig = config
        self.block_size = config.block_size
        self._custom: Tensor | None = None
        if config.custom_layout is not None:
            self._custom = custom_layout_tensor(parse_custom_layout(config.custom_layout))
        self._layouts: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._plans: OrderedDict[tuple[int, int, bool, str], Plan] = OrderedDict()

    @classmethod
    def from_layout(cls, layout: Tensor, *, block_size: int = 64, **fields: Any) -> SparseAttention:
        """Module for an explicit bool layout tensor ``(nb, nb)`` or ``(H, nb, nb)``."""
        cfg = SparseConfig(layout="custom", custom_layout=layout, block_size=block_size, **fields)
        return cls(cfg)

    # ------------------------------------------------------------------ layouts
    def layout(self, length: int, num_heads: int) -> Tensor:
        """The block layout ``(H, nb, nb)`` bool (CPU) for ``length`` tokens; built once, cached."""
        if length < 1 or num_heads < 1:
            raise ValueError(f"layout needs length >= 1 and num_heads >= 1, got {length}, {num_heads}")
        key = (length, num_heads)
        hit = self._layouts.get(key)
        if hit is not None:
            self._layouts.move_to_end(key)
            return hit
        layout = self._build_layout(length, num_heads)
        self._layouts[key] = layout
        if len(self._layouts) > _CACHE_SIZE:
            self._layouts.popitem(last=False)
        return layout

    def _build_layout(self, length: int, heads: int) -> Tensor:
        cfg = self.config
        nb = math.ceil(length / self.block_size)
        if cfg.layout == "bigbird":
            return bigbird_layout(
                nb, heads, window=cfg.num_window_blocks, num_global=cfg.num_global_blocks,
                num_random=cfg.num_random_blocks, seed=cfg.seed, length=length,
            )
        if cfg.layout == "strided":
            return strided_layout(nb, heads, stride=cfg.stride or default_stride(nb))
        if cfg.layout == "fixed":
            # An automatic stride never falls below c (c <= l is the paper's constraint).
            stride = cfg.stride or max(default_stride(nb), cfg.c)
            return fixed_layout(nb, heads, stride=stride, c=cfg.c)
        assert self._custom is not None
        h0, nb0, _ = self._custom.shape
        if nb0 != nb:
            lo, hi = (nb0 - 1) * self.block_size + 1, nb0 * self.block_size
            raise ValueError(
                f"custom layout has {nb0} blocks per side, so with block_size={self.block_size} it "
                f"fits lengths {lo}..{hi}; got length {length} ({nb} blocks)"
            )
        if h0 != 1 and h0 != heads:
            raise ValueError(f"custom layout has {h0} heads but the input has {heads} heads")
        return self._custom.expand(heads, nb, nb).clone()

    def _head_count(self, num_heads: int | None) -> int:
        """Heads for ``pattern_mask``/``flops`` when the caller does not say."""
        if num_heads is not None:
            return num_heads
        if self.config.num_heads is not None:
            return self.config.num_heads
        if self._custom is not None:
            return self._custom.shape[0]
        if self.config.layout == "bigbird" and self.config.num_random_blocks > 0:
            raise ValueError(
                "the bigbird layout differs per head: call pattern_mask(L, num_heads=H) or set the "
                "config field num_heads"
            )
        return 1  # head-independent layout: (1, L, L) broadcasts over heads

    def pattern_mask(self, L: int, num_heads: int | None = None) -> Tensor:
        """Dense allowed pattern ``(H, L, L)`` bool: the expanded block layout (before any mask).

        ``H`` is ``num_heads``, else the config's ``num_heads``, else 1 for layouts that are the
        same in every head (bigbird with random blocks needs one of the two).
        """
        heads = self._head_count(num_heads)
        return expand_layout(self.layout(L, heads), self.block_size, L)  # (H, L, L)

    def _plan(self, length: int, heads: int, causal: bool, device: torch.device) -> Plan:
        key = (length, heads, causal, str(device))
        hit = self._plans.get(key)
        if hit is not None:
            self._plans.move_to_end(key)
            return hit
        plan = make_plan(self.layout(length, heads), self.block_size, length, causal, device)
        self._plans[key] = plan
        if len(self._plans) > _CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _check_heads(self, heads: int) -> None:
        if self.config.num_heads is not None and heads != self.config.num_heads:
            raise ValueError(
                f"input has {heads} heads but the {self.variant} config says "
                f"num_heads={self.config.num_heads}"
            )

    # ------------------------------------------------------------------ math
    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        bsz, heads, length, e = query.shape
        ev = value.shape[-1]
        self._check_heads(heads)
        b = self.block_size
        plan = self._plan(length, heads, masks.is_causal, query.device)
        pad = plan.padded_len - length
        if pad:  # zero tokens complete the last block; masks keep them out of every real row
            query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        qb = query.reshape(bsz, heads * plan.nb, b, e)  # (B, H*nb, b, E) one row per query block
        kb = key.reshape(bsz, heads * plan.nb, b, e)  # (B, H*nb, b, E)
        vb = value.reshape(bsz, heads * plan.nb, b, ev)  # (B, H*nb, b, Ev)
        key_mask = masks.key_mask
        if key_mask is not None and pad:
            key_mask = F.pad(key_mask, (0, pad), value=False)  # (B, Lp)
        km = None if key_mask is None else key_mask.reshape(bsz, plan.nb, b)  # (B, nb, b)
        scale = self.softmax_scale(e)
        outs = []
        for g in plan.groups:
            n, c = g.kv_rows.shape
            qg = qb[:, g.rows]  # (B, n, b, E)
            kg = kb[:, g.kv_rows].reshape(bsz, n, c * b, e)  # (B, n, c*b, E) gathered key blocks
            vg = vb[:, g.kv_rows].reshape(bsz, n, c * b, ev)  # (B, n, c*b, Ev)
            mask, dead = self._group_mask(g, masks, km, plan, length, query.dtype)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=mask, dropout_p=self.active_dropout, scale=scale
            )  # (B, n, b, Ev)
            outs.append(og.masked_fill(dead, 0.0) if dead is not None else og)
        if plan.has_empty:  # rows with no key block read this zero block
            outs.append(query.new_zeros(bsz, 1, b, ev))
        out = torch.cat(outs, dim=1)[:, plan.inverse]  # (B, H*nb, b, Ev) back in row order
        return out.reshape(bsz, heads, plan.padded_len, ev)[:, :, :length]  # (B, H, L, Ev)

    def _group_mask(
        self, g: Group, masks: Masks, km: Tensor | None, plan: Plan, length: int, dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor | None]:
        """SDPA mask of one group (None when nothing is masked) and its rows with nothing to attend.

        Returns (mask, dead): mask is bool, or float when a float attn_mask is in force, shaped
        (B|1, n|1, b|1, c*b); dead is (B|1, n, b|1, 1) or None.
        """
        n, c = g.kv_rows.shape
        b = self.block_size
        allowed = None if g.struct_mask is None else g.struct_mask[None, None]  # (1, 1, b, c*b)
        if km is not None:
            kmg = km[:, g.key_blocks].reshape(km.shape[0], n, 1, c * b)  # (B, n, 1, c*b)
            allowed = kmg if allowed is None else allowed & kmg
        bias = None
        if masks.attn_mask is not None:
            am = _gather_attn_mask(masks.attn_mask, g, plan, b, length)  # (B|1, n|1, b|1, c*b)
            if am.dtype == torch.bool:
                allowed = am if allowed is None else allowed & am
            else:
                bias = am
                finite = am != float("-inf")
                allowed = finite if allowed is None else allowed & finite
        if allowed is None:
            return None, None
        dead = ~allowed.any(dim=-1, keepdim=True)  # (B|1, n|1, b|1, 1)
        has_dead = bool(dead.any())
        if bias is None:
            return (allowed | dead if has_dead else allowed), (dead if has_dead else None)
        bias = bias.to(dtype).masked_fill(~allowed, float("-inf"))  # (B|1, n|1, b|1, c*b)
        return (bias.masked_fill(dead, 0.0) if has_dead else bias), (dead if has_dead else None)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        bsz, heads, length, _ = query.shape
        self._check_heads(heads)
        acc = self._accum_dtype(query)
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale)  # (B, H, L, L)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        pattern = self.pattern_mask(length, heads).to(query.device)[None]  # (1, H, L, L)
        allowed = masks.allowed(query.device)  # (B|1, H|1, L, L) or None
        allowed = pattern if allowed is None else allowed & pattern
        return masked_softmax(logits, allowed).to(query.dtype)  # (B, H, L, L)

    # ------------------------------------------------------------------ benchmark helpers
    def flops(
        self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
        is_causal: bool,
    ) -> float:
        """Useful forward FLOPs: 2 * (E + Ev) per allowed (query, key) pair of the pattern."""
        if q_len != k_len:
            raise ValueError(f"{self.variant} is self-attention only: q_len {q_len} != k_len {k_len}")
        layout = self.layout(q_len, heads).to(torch.float64)  # (H, nb, nb)
        nb = layout.shape[-1]
        sizes = torch.full((nb,), float(self.block_size), dtype=torch.float64)
        sizes[-1] = q_len - (nb - 1) * self.block_size  # partial last block
        pair_tokens = sizes[:, None] * sizes[None, :]  # (nb, nb) tokens per block pair
        if is_causal:
            idx = torch.arange(nb)
            pair_tokens = torch.where(idx[None, :] < idx[:, None], pair_tokens, 0.0)
            pair_tokens = pair_tokens + torch.diag(sizes * (sizes + 1) / 2)  # triangular diagonal
        pairs = float((layout * pair_tokens).sum())
        return 2.0 * (head_dim + value_dim) * pairs * batch

    def benchmark_baselines(self) -> dict[str, Callable[..., Tensor]]:
        """Naive formulation to time against: SDPA on the dense ``pattern_mask`` (O(L^2))."""

        def sdpa_dense_pattern(query: Tensor, key: Tensor, value: Tensor, is_causal: bool) -> Tensor:
            heads, length = query.shape[1], query.shape[2]
            mask = self.pattern_mask(length, heads).to(query.device)[None]  # (1, H, L, L)
            if is_causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=self.softmax_scale(query.shape[-1])
            )

        return {"sdpa_dense_pattern": sdpa_dense_pattern}


class BigBirdAttention(SparseAttention):
    """``sparse`` with the layout defaulting to BigBird (the ``bigbird`` variant)."""

    variant = "bigbird"

    def __init__(self, config: BigBirdConfig) -> None:
        super().__init__(config)


def _gather_attn_mask(m: Tensor, g: Group, plan: Plan, b: int, length: int) -> Tensor:
    """The entries of a 4-D ``attn_mask`` (B|1, H|1, L|1, L|1) that one group reads.

    Returns (B|1, n, b|1, c*b), same dtype; padded tokens read True / 0 (the structural mask
    already keeps padded keys out, and padded queries are discarded).
    """
    bm, hm, lq, lk = m.shape
    n, c = g.kv_rows.shape
    pad = plan.padded_len - length
    fill = True if m.dtype == torch.bool else 0.0
    if pad and (lq != 1 or lk != 1):
        m = F.pad(m, (0, pad if lk != 1 else 0, 0, pad if lq != 1 else 0), value=fill)
    nq, bq = (plan.nb, b) if lq != 1 else (1, 1)
    nk, bk = (plan.nb, b) if lk != 1 else (1, 1)
    m6 = m.reshape(bm, hm, nq, bq, nk, bk)
    zeros = torch.zeros_like(g.heads)
    hi = (g.heads if hm != 1 else zeros)[:, None]  # (n, 1)
    qi = (g.query_blocks if nq != 1 else zeros)[:, None]  # (n, 1)
    ki = g.key_blocks if nk != 1 else torch.zeros_like(g.key_blocks)  # (n, c)
    sel = m6[:, hi, qi, :, ki, :]  # (n, c, B|1, bq, bk): advanced indices first
    sel = sel.permute(2, 0, 3, 1, 4).expand(bm, n, bq, c, b)  # (B|1, n, bq, c, b)
    return sel.reshape(bm, n, bq, c * b)
