"""Tiny randomly initialised transformers models for the HF integration tests (no downloads).

Import only after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import attnreg.integrations.transformers  # noqa: F401  (registers the attnreg:<name> keys)

VOCAB = 61
PAD = 0
BUILTINS = ("dot_product", "additive", "local", "linear", "performer", "sparse", "bigbird")
# Small patterns so that a 9-token prompt plus 8 new tokens spans several windows, chunks and
# blocks (ragged last ones); sparse/bigbird with a layout that does not depend on the total
# length, so that generation with the cache can equal recomputing without it.
FIELDS: dict[str, dict[str, Any]] = {
    "dot_product": {},
    "additive": {"chunk_size": 3},
    "local": {"window": 3, "block_size": 4},
    "linear": {"chunk_size": 4},
    "performer": {"chunk_size": 4, "num_features": 16},
    "sparse": {"block_size": 4, "stride": 2},
    "bigbird": {"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 0},
}
NO_DROPOUT = ("linear", "performer")  # declare dropout=False


def llama_config(variant: str | None = None, **overrides: Any) -> LlamaConfig:
    """2 layers, 4 query heads over 2 key/value heads (grouped-query), head_dim 8."""
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False,
    )
    if variant is not None:
        kw["attnreg"] = dict(FIELDS[variant])
    return LlamaConfig(**{**kw, **overrides})


def gpt2_config(variant: str | None = None, **overrides: Any) -> GPT2Config:
    """2 layers, 4 heads, head_dim 8; per-layer scaling (scale_attn_by_inverse_layer_idx)."""
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        scale_attn_by_inverse_layer_idx=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
        attn_pdrop=0.0 if variant in NO_DROPOUT else 0.1,
    )
    if variant is not None:
        kw["attnreg"] = dict(FIELDS[variant])
    return GPT2Config(**{**kw, **overrides})


CONFIGS = {"llama": llama_config, "gpt2": gpt2_config}


def build(arch: str, impl: str, variant: str | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A tiny model of ``arch`` with ``attn_implementation=impl`` (weights from ``seed``)."""
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](variant, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(dtype)


def batch(seed: int = 1, length: int = 9, pads: tuple[int, ...] = (0, 3)
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and a left-padding mask (B, L) (1 = real token), row b with pads[b] pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(pads), length), generator=g)  # (B, L)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = PAD, 0
    return ids, mask
