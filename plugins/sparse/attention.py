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
from .gather import Scratch, finish_mask, full_rows_attn_mask, gather_attn_mask, gather_rows
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
_STREAM_BYTES = 8 << 20  # gathered keys + values per SDPA call without autograd


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
        # Inference gather buffers: owned by this instance (freed with it), not in state_dict.
        self._scratch = Scratch()

    @classmethod
    def from_layout(cls, layout: Tensor, *, block_size: int = 64, **fields: Any) -> SparseAttention:
        """Module for an explicit bool layout tensor ``(nb, nb)`` or ``(H, nb, nb)``."""
        cfg = SparseConfig(layout="custom", custom_layout=layout, block_size=block_size, **fields)
        return cls(cfg)

    # ------------------------------------------------------------------ layouts
    def layout(self, length: int, num_heads: int) -> Tensor:
        """The block layout ``(H, nb, nb)`` bool (CPU) for ``length`` tokens; built once, cached
        (the cached tensor is returned: do not modify it in place)."""
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
        rows_total = heads * plan.nb
        pad = plan.padded_len - length
        if pad:  # zero tokens complete the last block; masks keep them out of every real row
            query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        key_mask = masks.key_mask
        if key_mask is not None and pad:
            key_mask = F.pad(key_mask, (0, pad), value=False)  # (B, Lp)
        km = None if key_mask is None else key_mask.reshape(bsz, plan.nb, b)  # (B, nb, b)
        scale = self.softmax_scale(e)
        outs = []
        # One flat row per (batch, head, block): index_select on dim 0 copies whole blocks. All
        # groups gather at once, so that backward is one index_add per input.
        q3 = query.reshape(bsz * rows_total, b, e)  # (B*H*nb, b, E)
        k3 = key.reshape(bsz * rows_total, b, e)  # (B*H*nb, b, E)
        v3 = value.reshape(bsz * rows_total, b, ev)  # (B*H*nb, b, Ev)
        # Autograd keeps the gathered blocks for backward; without it they are scratch space and
        # reuse this module's buffers (fresh multi-MB buffers cost page faults that rival the
        # copy itself); a concurrent call on this module from another thread allocates its own.
        reuse = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                  or value.requires_grad))
        batch_off = torch.arange(bsz, device=query.device) * rows_total  # (B,): first row of a batch item
        with self._scratch.lease(reuse) as scratch:  # the views below read the buffers until here
            if plan.groups and reuse:
                for g in plan.groups:
                    outs.append(self._group_streamed(g, scratch, q3, k3, v3, masks, km, plan, length,
                                                     batch_off, scale))
            elif plan.groups:
                index = [_gather_index(g, batch_off, 0, g.rows.shape[0]) for g in plan.groups]
                qi = torch.cat([i for i, _ in index])
                ki = torch.cat([j for _, j in index])
                q_all = scratch.gather("q", q3, qi)  # (sum n*B, b, E)
                k_all = scratch.gather("k", k3, ki)  # (sum n*B*c, b, E)
                v_all = scratch.gather("v", v3, ki)  # (sum n*B*c, b, Ev)
                # split (not slicing): its backward assembles the gradient in one pass.
                q_parts = q_all.split([g.rows.shape[0] * bsz for g in plan.groups])
                k_parts = k_all.split([g.kv_rows.numel() * bsz for g in plan.groups])
                v_parts = v_all.split([g.kv_rows.numel() * bsz for g in plan.groups])
                for g, qp, kp, vp in zip(plan.groups, q_parts, k_parts, v_parts, strict=True):
                    mask, dead = self._group_mask(g, masks, km, plan, length, query.dtype)
                    outs.append(self._attend_rows(qp, kp, vp, g.kv_rows.shape[1], bsz, mask, dead,
                                                  scale))  # (n, B, b, Ev)
        if plan.full is not None:
            outs.append(self._attend_full(plan, query, key, value, masks, key_mask, scale, length))
        if plan.has_empty:
            outs.append(query.new_zeros(1, bsz, b, ev))  # read by rows with no key block
        out = gather_rows(torch.cat(outs), plan.inverse)  # (H*nb, B, b, Ev) in row order
        out = out.view(heads, plan.nb, bsz, b, ev).permute(2, 0, 1, 3, 4)  # (B, H, nb, b, Ev)
        return out.reshape(bsz, heads, plan.padded_len, ev)[:, :, :length]  # (B, H, L, Ev)

    def _group_streamed(
        self, g: Group, scratch: Any, q3: Tensor, k3: Tensor, v3: Tensor, masks: Masks,
        km: Tensor | None, plan: Plan, length: int, batch_off: Tensor, scale: float,
    ) -> Tensor:
        """One group without autograd, gathered and attended a few rows at a time (n, B, b, Ev).

        Gathering every row first needs the group's keys and values all at once (536 MB of scratch
        for bigbird at B=1, H=8, L=16K); chunks of ~8 MB need 8 MB, at the same speed within
        noise (measured 263-300 ms either way, forward at L=16K).
        """
        n, c = g.kv_rows.shape
        bsz = batch_off.shape[0]
        mask, dead = self._group_mask(g, masks, km, plan, length, q3.dtype)  # (n|1, ...) or None
        step = max(1, _STREAM_BYTES // (bsz * c * self.block_size * (q3.shape[-1] + v3.shape[-1])
                                        * q3.element_size()))
        parts = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            qi, ki = _gather_index(g, batch_off, r0, r1)
            m, d = (t[r0:r1] if t is not None and t.shape[0] > 1 else t for t in (mask, dead))
            # SDPA's output is a fresh tensor, so the next chunk may reuse the scratch.
            parts.append(self._attend_rows(scratch.gather("q", q3, qi), scratch.gather("k", k3, ki),
                                           scratch.gather("v", v3, ki), c, bsz, m, d, scale))
        return torch.cat(parts) if len(parts) > 1 else parts[0]  # (n, B, b, Ev)

    def _attend_rows(self, q: Tensor, k: Tensor, v: Tensor, c: int, bsz: int, mask: Tensor | None,
                     dead: Tensor | None, scale: float) -> Tensor:
        """SDPA over gathered rows: q (r*B, b, E), k / v (r*B*c, b, E|Ev) -> (r, B, b, Ev); rows
        with nothing to attend (``dead``) give 0."""
        b = self.block_size
        r = q.shape[0] // bsz
        og = F.scaled_dot_product_attention(
            q.view(r, bsz, b, q.shape[-1]), k.view(r, bsz, c * b, k.shape[-1]),
            v.view(r, bsz, c * b, v.shape[-1]),  # (r, B, b|c*b, E|Ev)
            attn_mask=mask, dropout_p=self.active_dropout, scale=scale,
        )  # (r, B, b, Ev)
        return og.masked_fill(dead, 0.0) if dead is not None else og

    def _attend_full(
        self, plan: Plan, query: Tensor, key: Tensor, value: Tensor, masks: Masks,
        key_mask: Tensor | None, scale: float, length: int,
    ) -> Tensor:
        """Rows that see every key block: their queries against the whole (padded) sequence.

        Returns (H*m, B, b, Ev) in the order of ``plan.full.rows``.
        """
        full = plan.full
        assert full is not None
        bsz, heads, lp, e = query.shape
        b = self.block_size
        m = full.query_blocks.shape[1]
        hh = torch.arange(heads, device=query.device)[:, None]  # (H, 1)
        qf = query.view(bsz, heads, plan.nb, b, e)[:, hh, full.query_blocks]  # (B, H, m, b, E)
        qf = qf.reshape(bsz, heads, m * b, e)  # (B, H, m*b, E)
        allowed = None if full.key_valid is None else full.key_valid[None, None, None]  # (1, 1, 1, Lp)
        if key_mask is not None:
            kmf = key_mask[:, None, None, :]  # (B, 1, 1, Lp)
            allowed = kmf if allowed is None else allowed & kmf
        bias = None
        if masks.attn_mask is not None:
            am = full_rows_attn_mask(masks.attn_mask, full, plan, b, length)  # (B|1, H|1, m*b|1, Lp|1)
            allowed, bias = _with_attn_mask(allowed, am)
        mask, dead = finish_mask(allowed, bias, query.dtype)
        og = F.scaled_dot_product_attention(
            qf, key, value, attn_mask=mask, dropout_p=self.active_dropout, scale=scale
        )  # (B, H, m*b, Ev)
        if dead is not None:
            og = og.masked_fill(dead, 0.0)
        ev = og.shape[-1]
        return og.reshape(bsz, heads * m, b, ev).transpose(0, 1)  # (H*m, B, b, Ev)

    def _group_mask(
        self, g: Group, masks: Masks, km: Tensor | None, plan: Plan, length: int, dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor | None]:
        """SDPA mask of one group (None when nothing is masked) and its rows with nothing to attend.

        Returns (mask, dead): mask is bool, or float when a float attn_mask is in force, shaped
        (n|1, B|1, b|1, c*b); dead is (n, B|1, b|1, 1) or None.
        """
        n, c = g.kv_rows.shape
        b = self.block_size
        allowed = None if g.struct_mask is None else g.struct_mask[None, None]  # (1, 1, b, c*b)
        if km is not None:
            kmg = km[:, g.key_blocks].transpose(0, 1).reshape(n, km.shape[0], 1, c * b)  # (n, B, 1, c*b)
            allowed = kmg if allowed is None else allowed & kmg
        bias = None
        if masks.attn_mask is not None:
            am = gather_attn_mask(masks.attn_mask, g, plan, b, length)  # (n, B|1, b|1, c*b)
            allowed, bias = _with_attn_mask(allowed, am)
        return finish_mask(allowed, bias, dtype)

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


def _gather_index(g: Group, batch_off: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
    """Flat indices of rows ``r0:r1`` of group ``g`` for every batch item: queries (r*B,) and
    their key blocks (r*B*c,), row-major then batch, as ``_attend_rows`` views them."""
    qi = (g.rows[r0:r1, None] + batch_off).reshape(-1)
    ki = (g.kv_rows[r0:r1, None, :] + batch_off[:, None]).reshape(-1)
    return qi, ki


def _with_attn_mask(allowed: Tensor | None, am: Tensor) -> tuple[Tensor, Tensor | None]:
    """AND a gathered ``attn_mask`` into ``allowed``; a float mask also becomes the SDPA bias
    (its ``-inf`` entries count as masked, so empty rows are still detected)."""
    if am.dtype == torch.bool:
        return (am if allowed is None else allowed & am), None
    finite = am != float("-inf")
    return (finite if allowed is None else allowed & finite), am
