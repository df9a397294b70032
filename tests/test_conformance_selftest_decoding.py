"""Self-test of the decoding and grouped-query checks: each deliberately broken copy of the
textbook variant is caught by the check named for its bug, and a correct variant with the same
manifest passes that check."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from conformance_toys import ALL, Textbook, assert_caught, registered_toys
from torch import Tensor

from attnreg.conformance import CheckFailure, run_check
from attnreg.core import DecodeState, KVCacheState, Masks, VariantSpec, causal_mask, check_inputs


class IgnoresCache(Textbook):
    """decode keeps the cache up to date but attends only to the new tokens."""

    variant = "selftest_ignores_cache"

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, DecodeState]:
        assert isinstance(state, KVCacheState)
        state = state.append(key, value, key_mask)
        masks = check_inputs(self.variant, self.capabilities, query, key, value, None, key_mask, True)
        return self._attend(query, key, value, masks), state


class DetachedCache(Textbook):
    """Caches detached keys and values: outputs are right, but no gradient flows into a cached
    position from a later decode call."""

    variant = "selftest_detached_cache"

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState,
                key_mask: Tensor | None) -> tuple[Tensor, DecodeState]:
        assert isinstance(state, KVCacheState)
        state = state.append(key.detach(), value.detach(), key_mask, in_place=False)
        assert state.key is not None and state.value is not None
        k_all = torch.cat([state.key[:, :, : -key.shape[2]], key], dim=2)  # the new keys keep their graph
        v_all = torch.cat([state.value[:, :, : -key.shape[2]], value], dim=2)
        masks = check_inputs(self.variant, self.capabilities, query, k_all, v_all, None, state.key_mask,
                             True, "lower_right")
        return self._attend(query, k_all, v_all, masks), state


class UpperLeftOffset(Textbook):
    """Ignores ``masks.q_offset``: causal masks stay upper-left aligned (SDPA's default)."""

    variant = "selftest_upper_left_offset"

    def _allowed(self, masks: Masks, device: torch.device) -> Tensor | None:
        return dataclasses.replace(masks, q_offset=0).allowed(device)


@dataclasses.dataclass
class ForgetfulState(KVCacheState):
    """index_select reorders every buffer but the values."""

    def index_select(self, index: Tensor) -> ForgetfulState:
        return dataclasses.replace(super().index_select(index), value_buffer=self.value_buffer)


class BadReorder(Textbook):
    """Its decoding state's index_select leaves the cached values in the old batch order."""

    variant = "selftest_bad_reorder"

    def _init_state(self, batch: int, heads: int, head_dim: int, value_dim: int, dtype: torch.dtype,
                    device: torch.device, max_length: int | None) -> DecodeState:
        return ForgetfulState(batch, heads, head_dim, value_dim, dtype, device, max_length=max_length)


class LaxDecode(Textbook):
    """Overrides decode without the input checks: exceeding max_length goes unnoticed."""

    variant = "selftest_lax_decode"

    def decode(self, query: Tensor, key: Tensor, value: Tensor, state: DecodeState, *,
               key_mask: Tensor | None = None) -> tuple[Tensor, DecodeState]:
        return self._decode(query, key, value, state, key_mask)


class TiledGroups(Textbook):
    """Declares grouped_query, but tiles key/value heads (query head i reads head i % Hkv)."""

    variant = "selftest_tiled_groups"

    def _repeat(self, t: Tensor, heads: int) -> Tensor:
        return t.repeat(1, heads // t.shape[1], 1, 1)  # (B, H, L, D): heads 0, 1, 0, 1, ...


class NoDecoding(Textbook):
    """Honestly declares decoding=False (the base class then refuses lower_right and decode)."""

    variant = "selftest_no_decoding"
    capabilities = dataclasses.replace(ALL, decoding=False)


class SilentLowerRight(NoDecoding):
    """Declares decoding=False, but silently turns lower-right alignment into an explicit mask."""

    variant = "selftest_silent_lower_right"

    @staticmethod
    def _as_mask(query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool,
                 alignment: str) -> tuple[Tensor | None, bool]:
        if not (is_causal and alignment == "lower_right" and attn_mask is None):
            return attn_mask, is_causal
        lq, lk = query.shape[2], key.shape[2]
        return causal_mask(lq, lk, query.device, lk - lq), False  # (Lq, Lk)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *, attn_mask: Tensor | None = None,
                key_mask: Tensor | None = None, is_causal: bool = False,
                causal_alignment: str = "upper_left") -> Tensor:
        am, causal = self._as_mask(query, key, attn_mask, is_causal, causal_alignment)
        return super().forward(query, key, value, attn_mask=am, key_mask=key_mask, is_causal=causal)

    def attention_weights(self, query: Tensor, key: Tensor, *, attn_mask: Tensor | None = None,
                          key_mask: Tensor | None = None, is_causal: bool = False,
                          causal_alignment: str = "upper_left") -> Tensor:
        am, causal = self._as_mask(query, key, attn_mask, is_causal, causal_alignment)
        return super().attention_weights(query, key, attn_mask=am, key_mask=key_mask, is_causal=causal)


class NoGrouped(Textbook):
    """Honestly declares grouped_query=False."""

    variant = "selftest_no_grouped"
    capabilities = dataclasses.replace(ALL, grouped_query=False)


class SilentGrouped(NoGrouped):
    """Declares grouped_query=False, but silently repeats grouped key/value heads."""

    variant = "selftest_silent_grouped"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, **kw: object) -> Tensor:
        h = query.shape[1]
        return super().forward(query, self._repeat(key, h), self._repeat(value, h), **kw)  # type: ignore[arg-type]

    def attention_weights(self, query: Tensor, key: Tensor, **kw: object) -> Tensor:
        return super().attention_weights(query, self._repeat(key, query.shape[1]), **kw)  # type: ignore[arg-type]


# broken class -> (the check that must catch it, a correct variant with the same capabilities)
BROKEN = {
    IgnoresCache: ("decode_matches_forward", Textbook),
    DetachedCache: ("decode_gradients", Textbook),
    UpperLeftOffset: ("lower_right_alignment", Textbook),
    BadReorder: ("state_reorder", Textbook),
    LaxDecode: ("decode_invalid_inputs", Textbook),
    TiledGroups: ("grouped_query_matches_repeat", Textbook),
    SilentLowerRight: ("unsupported_features_raise", NoDecoding),
    SilentGrouped: ("unsupported_features_raise", NoGrouped),
}


@pytest.fixture(scope="module")
def registered() -> Iterator[dict[str, VariantSpec]]:
    """Register the textbook variant, the honest controls and every broken one for this module."""
    with registered_toys(Textbook, NoDecoding, NoGrouped, *BROKEN) as specs:
        yield specs


@pytest.mark.parametrize("cls", list(BROKEN), ids=lambda c: c.variant)
def test_broken_variant_is_caught_by_its_check(registered: dict[str, VariantSpec],
                                               cls: type[Textbook]) -> None:
    check, control = BROKEN[cls]
    assert_caught(cls, check, control, "B=", "declared", "max_length")  # names the sizes or the feature


def test_upper_left_decoder_fails_decoding_too(registered: dict[str, VariantSpec]) -> None:
    with pytest.raises(CheckFailure, match=r"decode in calls of .* max \|error\| = [0-9.e+-]+"):
        run_check(UpperLeftOffset.variant, "decode_matches_forward")


def test_honest_controls_pass_the_other_direction(registered: dict[str, VariantSpec]) -> None:
    """The declared-True side of the same flags: the textbook variant's decoding and grouped
    key/value work, and the controls pass the declared-features check too."""
    for name in (Textbook.variant, NoDecoding.variant, NoGrouped.variant):
        run_check(name, "declared_features_work")
    with pytest.raises(CheckFailure, match="silently"):
        run_check(SilentLowerRight.variant, "unsupported_features_raise")
