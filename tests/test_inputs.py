"""Bad tensors raise ValueError naming the argument and the shapes; undeclared features raise
UnsupportedFeatureError naming the variant and the feature."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import Attention, AttentionConfig, Capabilities, UnsupportedFeatureError

q = torch.randn(2, 3, 5, 8)  # (B, H, L, E)


@pytest.mark.parametrize(
    "args,kwargs,pattern",
    [
        ((q[0], q, q), {}, r"query must be 4-D \(B, H, L, E\), got shape \(3, 5, 8\)"),
        ((q, torch.randn(2, 3, 5, 4), q), {}, r"key shape \(2, 3, 5, 4\) does not match query shape"),
        ((q, q, torch.randn(2, 3, 6, 8)), {}, r"value shape \(2, 3, 6, 8\) does not match key shape"),
        ((q, torch.randn(2, 4, 5, 8), q), {}, r"key shape \(2, 4, 5, 8\)"),
        ((q, q, q), {"attn_mask": torch.ones(5, 4, dtype=torch.bool)},
         r"attn_mask shape \(5, 4\) is not broadcastable to \(B, H, Lq, Lk\) = \(2, 3, 5, 5\)"),
        ((q, q, q), {"attn_mask": torch.ones(1, 2, 3, 5, 5, dtype=torch.bool)}, r"attn_mask shape"),
        ((q, q, q), {"attn_mask": torch.ones(5, 5, dtype=torch.int64)},
         r"attn_mask must be bool .* got torch.int64"),
        ((q, q, q), {"attn_mask": torch.zeros(5, 5, dtype=torch.float64)},
         r"float attn_mask dtype torch.float64 must match query dtype torch.float32"),
        ((q, q, q), {"key_mask": torch.ones(2, 4, dtype=torch.bool)},
         r"key_mask shape \(2, 4\) does not match \(B, Lk\) = \(2, 5\)"),
        ((q, q, q), {"key_mask": torch.ones(2, 5)}, r"key_mask must be a bool tensor"),
        ((q, q.double(), q), {}, r"key dtype torch.float64 differs from query dtype torch.float32"),
        ((q.long(), q, q), {}, r"query must be a floating tensor"),
        ((q, q, q), {"is_causal": 1}, r"is_causal must be a bool"),
        ((q, q, None), {}, r"value must be a torch.Tensor"),
        ((q[:, :, :0], q, q), {}, r"non-zero lengths"),
    ],
)
def test_bad_tensors_raise_value_error(args: tuple, kwargs: dict, pattern: str) -> None:
    attn = attnreg.build("dot_product")
    with pytest.raises(ValueError, match=pattern):
        attn(*args, **kwargs)


class _Cfg(AttentionConfig):
    variant: str = "minimal"


class _Minimal(Attention):
    """Declares nothing optional: every feature must be refused by the base class."""

    variant = "minimal"
    capabilities = Capabilities(dtypes=(torch.float32,))

    def _attend(self, query, key, value, masks):  # pragma: no cover - never reached in these tests
        return value


@pytest.mark.parametrize(
    "kwargs,feature",
    [
        ({"is_causal": True}, "is_causal=True"),
        ({"key_mask": torch.ones(2, 5, dtype=torch.bool)}, "key_mask"),
        ({"attn_mask": torch.ones(5, 5, dtype=torch.bool)}, "attn_mask"),
    ],
)
def test_undeclared_features_raise_unsupported(kwargs: dict, feature: str) -> None:
    with pytest.raises(UnsupportedFeatureError, match=f"'minimal' does not support {feature}"):
        _Minimal(_Cfg())(q, q, q, **kwargs)


def test_undeclared_cross_attention_dtype_and_dropout() -> None:
    attn = _Minimal(_Cfg())
    with pytest.raises(UnsupportedFeatureError, match="cross attention"):
        attn(q, torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8))
    with pytest.raises(UnsupportedFeatureError, match="dtype torch.float64"):
        attn(q.double(), q.double(), q.double())
    with pytest.raises(UnsupportedFeatureError, match="dropout=0.1"):
        _Minimal(_Cfg(dropout=0.1))


def test_float_mask_requires_declaration() -> None:
    class _BoolOnly(_Minimal):
        capabilities = Capabilities(attn_mask=True)

    with pytest.raises(UnsupportedFeatureError, match="float"):
        _BoolOnly(_Cfg())(q, q, q, attn_mask=torch.zeros(5, 5))


def test_repeat_kv_interleaves_groups() -> None:
    from attnreg.core import repeat_kv

    kv = torch.arange(2.0).view(1, 2, 1, 1)  # (B, Hkv=2, L, D): head j holds j
    assert repeat_kv(kv, 6).flatten().tolist() == [0, 0, 0, 1, 1, 1]  # head j serves j*G .. j*G+G-1
    assert repeat_kv(kv, 2) is kv
    with pytest.raises(ValueError, match="5 query heads are not a multiple of 2 key/value heads"):
        repeat_kv(kv, 5)
