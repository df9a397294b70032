"""The decoding mode of the bench (``--modes decode``): the time of one generated token and the
memory a variant keeps between tokens, against the context length.

A point at length L is a state holding a context of L positions (B sequences, H heads), then one
``decode`` call of a single token, timed (under ``no_grad``, eval mode). Every timed call decodes
its token onto the same filled state (the returned state is dropped), so every step sees exactly
L positions however many repeats are timed; the steps are short, so many are timed (up to
``DECODE_REPEATS``) to span enough time to reject disturbed ones. The dense reference
(``sdpa``) is the bare kernel of a KV-cache step: SDPA of one query over L cached keys. The state
is filled by prefilling the context through ``decode`` in chunks; the core KV cache
(``KVCacheState``, whose step cost depends only on its length) is filled by appending random
keys directly, so quadratic variants (additive) can be measured at long contexts without an
O(L^2) prefill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnreg.core import Attention, KVCacheState

__all__ = ["DECODE_REPEATS", "PREFILL_CHUNK", "fill_state", "prepare_decode_call"]

PREFILL_CHUNK = 4096  # positions per prefill call (bounds its working memory)
DECODE_REPEATS = 2000  # most timed steps per point (a step takes ~0.1-10 ms)


def fill_state(module: Attention, batch: int, heads: int, head_dim: int, length: int,
               dtype: torch.dtype, gen: torch.Generator) -> Any:
    """A decoding state holding ``length`` random positions (see the module docstring)."""
    # max_length: the context and the one token every timed step adds to it.
    state = module.init_state(batch, heads, head_dim, dtype=dtype, max_length=length + 1)
    if type(state) is KVCacheState:
        k = torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)  # (B, H, L, E)
        v = torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)  # (B, H, L, E)
        with torch.no_grad():  # into the buffers sized for max_length, as a decode call would
            return state.append(k, v, None)
    with torch.no_grad():
        for start in range(0, length, PREFILL_CHUNK):
            n = min(PREFILL_CHUNK, length - start)
            q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype) for _ in range(3))
            _, state = module.decode(q, k, v, state)
    return state


def prepare_decode_call(kind: str, module: Attention | None, batch: int, heads: int, head_dim: int,
                        length: int, dtype: torch.dtype, seed: int
                        ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(call, objects to keep alive, info) of one decode step at context ``length``.

    ``info["state_bytes"]``: what the state holds after the context is filled.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, 1, head_dim)
    q1, k1, v1 = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))  # (B, H, 1, E)
    if kind == "sdpa":
        keys = torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)  # (B, H, L, E)
        values = torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)  # (B, H, L, E)

        def sdpa_step() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(q1, keys, values)  # (B, H, 1, E)

        return sdpa_step, (keys, values), {"state_bytes": 2 * keys.numel() * keys.element_size()}
    assert module is not None
    state = fill_state(module, batch, heads, head_dim, length, dtype, gen)
    info = {"state_bytes": state.nbytes}

    def step() -> None:
        with torch.no_grad():
            module.decode(q1, k1, v1, state)  # the returned state (L + 1 positions) is dropped

    return step, (module, state), info
