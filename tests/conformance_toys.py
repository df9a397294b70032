"""Toy variants for the conformance self-tests: a textbook softmax attention that must pass every
check, and ``spec_for`` to register it (or a deliberately broken copy) under its own name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, create_model
from torch import Tensor

import attnreg
from attnreg.core import (
    Attention,
    AttentionConfig,
    Capabilities,
    Masks,
    VariantSpec,
    accum_dtype,
    dot_product_logits,
    hits_under,
    masked_softmax,
    poison_rows,
    screen,
)

ALL = Capabilities(causal=True, key_mask=True, attn_mask=True, float_mask=True, cross_attention=True,
                   dropout=True, decoding=True, grouped_query=True, complexity="O(Lq*Lk*E)")


class Textbook(Attention):
    """softmax(scale * Q K^T + mask) V, straight from the formula: must pass every check.

    Decodes with the default KV cache (``masks.allowed()`` honours ``q_offset``) and reads
    grouped key/value heads by repeating them per query head. Screens keys and values for
    NaN/inf (``screen``): a weight of 0 times a NaN value is NaN, so without it a NaN at a
    masked position would poison every row.
    """

    variant = "selftest_textbook"
    capabilities = ALL

    def _allowed(self, masks: Masks, device: torch.device) -> Tensor | None:
        return masks.allowed(device)

    def _repeat(self, t: Tensor, heads: int) -> Tensor:
        """(B, Hkv, L, D) -> (B, H, L, D): key/value head j serves query heads j*G .. j*G+G-1."""
        return t.repeat_interleave(heads // t.shape[1], dim=1)

    def _logits(self, q: Tensor, k: Tensor, masks: Masks) -> Tensor:
        acc = accum_dtype(q)
        k = self._repeat(k, q.shape[1])  # (B, H, Lk, E)
        logits = dot_product_logits(q.to(acc), k.to(acc), self.scale)  # (B, H, Lq, Lk)
        if masks.float_mask is not None:
            logits = logits + masks.float_mask.to(acc)
        return logits

    def _softmax(self, logits: Tensor, allowed: Tensor | None) -> Tensor:
        return masked_softmax(logits, allowed)

    def _weights(self, query: Tensor, key: Tensor, masks: Masks) -> Tensor:
        w = self._softmax(self._logits(query, key, masks), self._allowed(masks, query.device))
        return w.to(query.dtype)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        key, value, bad = screen(key, value, masks)  # non-finite entries -> 0, bad (B, Hkv, Lk) or None
        out = self._formula(query, key, value, masks)  # (B, H, Lq, Ev)
        return poison_rows(out, hits_under(bad, masks))  # rows that see a NaN/inf position: NaN

    def _formula(self, query: Tensor, key: Tensor, value: Tensor, masks: Masks) -> Tensor:
        w = self._softmax(self._logits(query, key, masks), self._allowed(masks, query.device))
        w = F.dropout(w, self.active_dropout)  # (B, H, Lq, Lk)
        value = self._repeat(value, query.shape[1])  # (B, H, Lk, Ev)
        return (w @ value.to(w.dtype)).to(query.dtype)  # (B, H, Lq, Ev)


def spec_for(cls: type[Attention], **extra: Any) -> VariantSpec:
    """A ``VariantSpec`` (with its own config model) for a toy variant class."""
    name = cls.variant
    config = create_model(
        f"{cls.__name__}Config", __base__=AttentionConfig,
        variant=(Literal[name], Field(name, description="Variant name.")),  # type: ignore[valid-type]
    )
    return VariantSpec(name=name, config=config, factory=cls, capabilities=cls.capabilities,
                       summary=cls.__doc__ or name, reference="attnreg conformance self-test", **extra)


@contextmanager
def registered_toys(*classes: type[Attention]) -> Iterator[dict[str, VariantSpec]]:
    """``spec_for`` of each toy class registered for the duration (by name), unregistered after."""
    specs = {cls.variant: spec_for(cls) for cls in classes}
    for spec in specs.values():
        attnreg.register(spec)
    try:
        yield specs
    finally:
        for name in specs:
            attnreg.unregister(name)


def assert_caught(broken: type[Attention], check: str, control: type[Attention], *hints: str) -> None:
    """``check`` fails ``broken`` with a message naming one of ``hints`` (the sizes, the feature),
    and passes ``control``, a correct variant with the same manifest: the bug fails it, not the
    check."""
    from attnreg.conformance import CheckFailure, run_check

    try:
        run_check(broken.variant, check)
    except CheckFailure as caught:
        assert any(h in str(caught) for h in hints), str(caught)
    else:
        raise AssertionError(f"{check} did not catch {broken.variant}")
    run_check(control.variant, check)
