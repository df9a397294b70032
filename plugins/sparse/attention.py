"""Block-sparse softmax attention: only the active (query block, key block) pairs are computed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import (
    Attention,
    Capabilities,
    DecodeState,
    LRUCache,
    Masks,
    dot_product_logits,
    masked_softmax,
    screen,
    screen_kv,
)

from .config import BigBirdConfig, SparseConfig
from .custom import custom_layout_tensor, layout_digest
from .decoding import BlockKVState
from .execute import run_plan
from .gather import Scratch
from .layouts import (
    bigbird_layout,
    default_stride,
    expand_layout,
    fixed_layout,
    strided_layout,
)
from .plan import Plan, RowTable, make_plan, offset_plan, row_table

__all__ = ["SparseAttention", "BigBirdAttention"]

T = TypeVar("T")
_CACHE_SIZE = 16  # layouts / plans / row tables kept per module (one per length, heads, ...)


def _on_cpu(build: Callable[[], T]) -> Callable[[], T]:
    """``build`` run with the CPU as the default device: layouts, plans and row tables are built
    from CPU index arithmetic (their device tensors are moved explicitly), also when the caller
    builds a model under ``with torch.device("meta")`` or ``"cuda"``."""

    def run() -> T:
        with torch.device("cpu"):
            return build()

    return run


class SparseAttention(Attention):
    """Exact softmax attention restricted to a block layout (bigbird, strided, fixed, custom).

    ``forward`` equals dense softmax attention with ``pattern_mask(L)`` ANDed with the call's
    masks, but gathers only the active key/value blocks of every query block: time and memory
    O(L * active_blocks * block_size * E). Under ``is_causal`` the causal part of the layout is
    used. With ``causal_alignment="lower_right"`` the Lq queries are the last positions of the
    Lk keys' sequence and read the layout of length Lk; ``decode`` keeps a KV cache and reads
    the layout of the state's ``max_length`` (see ``max_length_reason``).
    """

    variant = "sparse"
    capabilities = Capabilities(
        causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=False,
        dropout=True, normalized=True, permutation_invariant=False, learnable=False, decoding=True,
        complexity="O(L*k*b*E), k = active key blocks per query block, b = block_size; "
        "decode: O(k*b*E) per token",
    )

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self.config: SparseConfig = config
        self.block_size = config.block_size
        self._custom: Tensor | None = None
        self._custom_digest: str | None = None  # names the layout in decoding states' fingerprints
        if config.layout == "custom":
            with torch.device("cpu"):  # layouts live on the CPU, even under `with torch.device("meta")`
                self._custom = custom_layout_tensor(config.custom_blocks, config.custom_matrix)
                # (H|1, nb, nb)
            self._custom_digest = layout_digest(self._custom)
        # Derived data, shared by the threads calling this module (the caches lock themselves).
        self._layouts: LRUCache[Tensor] = LRUCache(_CACHE_SIZE)  # (length, heads)
        self._plans: LRUCache[Plan] = LRUCache(_CACHE_SIZE)  # (length, heads, causal, device)
        self._tables: LRUCache[RowTable] = LRUCache(_CACHE_SIZE)  # (length, heads)
        # Inference gather buffers: owned by this instance (freed with it), not in state_dict.
        self._scratch = Scratch()

    @classmethod
    def from_layout(cls, layout: Tensor, *, block_size: int = 64, **fields: Any) -> SparseAttention:
        """Module for an explicit bool layout tensor ``(nb, nb)`` or ``(H, nb, nb)``."""
        cfg = SparseConfig(layout="custom", custom_matrix=layout, block_size=block_size, **fields)
        return cls(cfg)

    # ------------------------------------------------------------------ layouts
    def layout(self, length: int, num_heads: int) -> Tensor:
        """The block layout ``(H, nb, nb)`` bool (CPU) for ``length`` tokens; built once, cached
        (the cached tensor is returned: do not modify it in place)."""
        if length < 1 or num_heads < 1:
            raise ValueError(f"layout needs length >= 1 and num_heads >= 1, got {length}, {num_heads}")
        build = _on_cpu(lambda: self._build_layout(length, num_heads))
        return self._layouts.get_or_build((length, num_heads), build)

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
        return _on_cpu(lambda: expand_layout(self.layout(L, heads), self.block_size, L))()  # (H, L, L)

    def _block_for(self, length: int) -> int:
        """The block size a call over ``length`` keys runs with: ``block_size``, or ``length`` when
        one block holds the whole sequence. The layout is then one block either way; padding
        queries and keys to a full block cost O(block_size^2) for a short sequence (a 5-token
        call with block_size=4096 took seconds)."""
        return min(self.block_size, length)

    def _plan(self, length: int, heads: int, causal: bool, device: torch.device) -> Plan:
        block = self._block_for(length)
        return self._plans.get_or_build(
            (length, heads, causal, str(device)),
            _on_cpu(lambda: make_plan(self.layout(length, heads), block, length, causal, device)),
        )

    def _row_table(self, length: int, heads: int) -> RowTable:
        """The causal rows of ``layout(length, heads)``, for lower-right calls and decoding."""
        build = _on_cpu(lambda: row_table(self.layout(length, heads)))
        return self._tables.get_or_build((length, heads), build)

    def _check_heads(self, heads: int) -> None:
        if self.config.num_heads is not None and heads != self.config.num_heads:
            raise ValueError(
                f"input has {heads} heads but the {self.variant} config says "
                f"num_heads={self.config.num_heads}"
            )

    # ------------------------------------------------------------------ math
    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        heads, e = query.shape[1], query.shape[3]
        self._check_heads(heads)
        lk = key.shape[2]
        block = self._block_for(lk)
        if masks.q_offset == 0:  # Lq == Lk: the cached plan of the whole layout
            plan = self._plan(lk, heads, masks.is_causal, query.device)
        else:  # lower-right causal: the last Lq positions, in the layout of length Lk
            table = self._row_table(lk, heads)
            plan = _on_cpu(lambda: offset_plan(table, block, masks.q_offset, lk, math.ceil(lk / block),
                                               query.device))()
        # A key hidden from some query by a causal diagonal block or the masks: NaN/inf there
        # must not leak (0 * NaN in a block's P @ V). Blocks outside the layout are never read,
        # but when autograd records, a row that sees a NaN would spread it in backward to every
        # key it read, also for rows the loss leaves out: screened too. The padding of a
        # partial last block is 0.
        hides = plan.active_pairs < heads * plan.nb * plan.q_blocks and self.records_graph(query, key, value)
        key, value, bad = screen(key, value, masks, hides)  # bad: (B, H, Lk) or None
        return run_plan(plan, query, key, value, masks.key_mask, masks.attn_mask, block=block,
                        scale=self.softmax_scale(e), dropout=self.active_dropout,
                        scratch=self._scratch, bad=bad)  # (B, H, Lq, Ev)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        heads, lk = query.shape[1], key.shape[2]
        self._check_heads(heads)
        acc = self._accum_dtype(query)
        logits = dot_product_logits(query.to(acc), key.to(acc), self.scale)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        # The queries are the last Lq positions (q_offset = Lk - Lq): their rows of the pattern.
        pattern = self.pattern_mask(lk, heads)[:, masks.q_offset :].to(query.device)[None]  # (1, H, Lq, Lk)
        allowed = masks.allowed(query.device)  # (B|1, H|1, Lq, Lk) or None
        allowed = pattern if allowed is None else allowed & pattern
        return masked_softmax(logits, allowed).to(query.dtype)  # (B, H, Lq, Lk)

    # ------------------------------------------------------------------ decoding
    def max_length_reason(self) -> str | None:
        """Why this config's layout depends on the total length, or None where it does not.

        Where it does, ``init_state`` needs ``max_length`` (decoding follows the layout of that
        total length); elsewhere the causal layout rows of the first blocks are the same at
        every length and ``max_length`` is optional.
        """
        cfg = self.config
        if cfg.layout == "bigbird" and cfg.num_random_blocks > 0:
            return ("its random blocks are drawn per (seed, head, total length); with "
                    "num_random_blocks=0 it would not depend on it")
        if cfg.layout in ("strided", "fixed") and cfg.stride is None:
            return ("its stride defaults to ceil(sqrt(number of blocks)) of the total length; "
                    "with an explicit stride in the config it would not depend on it")
        return None

    def _state_fingerprint(self) -> dict[str, Any]:
        """The cache's block size and the layout its queries follow (the fields of this layout)."""
        cfg = self.config
        fields: dict[str, Any] = {"block_size": cfg.block_size, "layout": cfg.layout}
        if cfg.layout == "bigbird":
            fields.update(num_window_blocks=cfg.num_window_blocks, num_global_blocks=cfg.num_global_blocks,
                          num_random_blocks=cfg.num_random_blocks, seed=cfg.seed)
        elif cfg.layout in ("strided", "fixed"):
            fields.update(stride=cfg.stride, **({"c": cfg.c} if cfg.layout == "fixed" else {}))
        else:  # a digest (computed once): the layout itself may be large
            fields["custom_layout_sha1"] = self._custom_digest
        return fields

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int,
                    dtype: torch.dtype, device: torch.device, max_length: int | None) -> DecodeState:
        self._check_heads(heads)
        reason = self.max_length_reason()
        if max_length is None and reason is not None:
            raise ValueError(
                f"init_state: {self.variant} with layout {self.config.layout!r} needs max_length, the "
                f"total length the sequence will reach (prompt + generated tokens): {reason}. Pass "
                "init_state(..., max_length=L); decoding then equals the causal forward over the "
                "whole sequence of length L"
            )
        if self._custom is not None:
            nb0 = self._custom.shape[1]
            lo, hi = (nb0 - 1) * self.block_size + 1, nb0 * self.block_size
            if max_length is None:
                max_length = hi  # all the custom layout covers
            elif not lo <= max_length <= hi:
                raise ValueError(
                    f"init_state: max_length={max_length} does not fit the custom layout: its {nb0} "
                    f"blocks of block_size={self.block_size} fit total lengths {lo}..{hi}"
                )
        if max_length is not None:
            self._row_table(max_length, heads)  # built now: layout errors (custom heads) surface here
        return BlockKVState(batch, heads, head_dim, value_dim, dtype, device, max_length=max_length,
                            block_size=self.block_size)

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, DecodeState]:
        if not isinstance(state, BlockKVState):
            raise ValueError(f"decode: {self.variant} needs the state of its own init_state (a "
                             f"BlockKVState), got {type(state).__name__}")
        start = state.length
        state = state.write(key, value, key_mask)
        assert state.key is not None and state.value is not None
        b = self.block_size
        # Without max_length the layout does not depend on the length: any covering one will do.
        layout_len = state.max_length if state.max_length is not None else state.capacity
        table = self._row_table(layout_len, state.heads)
        plan = _on_cpu(lambda: offset_plan(table, b, start, state.length, state.capacity // b,
                                           query.device))()
        key_all, value_all, bad = state.key, state.value, None
        # The state holds zeros at padding and past ``length``: only a chunk of T > 1 new
        # positions hides keys (its later ones, from ``start + 1`` on) from some of its queries.
        if query.shape[2] > 1:
            key_all, value_all, bad = screen_kv(key_all, value_all, start + 1)  # (B, H, capacity) or None
        out = run_plan(plan, query, key_all, value_all, state.key_mask, None, block=b,
                       scale=self.softmax_scale(query.shape[-1]), dropout=self.active_dropout,
                       scratch=self._scratch, bad=bad)  # (B, H, T, Ev)
        return out, state

    # ------------------------------------------------------------------ benchmark helpers
    def flops(
        self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_dim: int,
        is_causal: bool,
    ) -> float:
        """Useful forward FLOPs: 2 * (E + Ev) per allowed (query, key) pair of the pattern.

        ``q_len < k_len`` (with ``is_causal``) counts the last ``q_len`` positions, as a
        lower-right call or a decode step computes them.
        """
        if q_len != k_len:
            if not is_causal or q_len > k_len:
                raise ValueError(f"{self.variant} attends within one sequence: q_len {q_len} != k_len "
                                 f"{k_len} needs is_causal (the last q_len positions) and q_len <= k_len")
            return 2.0 * (head_dim + value_dim) * self._lower_right_pairs(heads, q_len, k_len) * batch
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

    def _lower_right_pairs(self, heads: int, q_len: int, k_len: int) -> float:
        """Allowed causal (query, key) pairs of the last ``q_len`` of ``k_len`` positions."""
        b = self.block_size
        layout = self.layout(k_len, heads).to(torch.float64)  # (H, nb, nb)
        idx = torch.arange(layout.shape[-1])
        before = (layout * (idx[None, :] < idx[:, None])).sum(-1) * b  # (H, nb): whole blocks J < I
        diag = layout[:, idx, idx]  # (H, nb)
        pos = torch.arange(k_len - q_len, k_len)  # (Lq,) query positions
        blk = pos // b
        return float((before[:, blk] + diag[:, blk] * (pos - blk * b + 1)).sum())

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

