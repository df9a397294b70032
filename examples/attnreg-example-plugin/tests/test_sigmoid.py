"""Sigmoid-specific tests: the fast path against the paper's formula, and its documented choices."""

import math

import pytest
import torch
from attnreg_sigmoid.reference import sigmoid_reference

import attnreg
from attnreg.core import Masks, UnsupportedFeatureError


def _qkv(lq=9, lk=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (lq, lk, lk)]


def test_discovered_through_the_entry_point():
    spec = attnreg.get_variant("sigmoid")
    assert spec.capabilities.normalized is False
    assert attnreg.get_variant("sigmoid_attention") is spec


@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_paper_formula(causal):
    q, k, v = _qkv(7, 11)
    km = torch.rand(2, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    attn = attnreg.build("sigmoid")
    out = attn(q, k, v, key_mask=km, is_causal=causal)
    want, _ = sigmoid_reference(q, k, v, Masks(2, 3, 7, 11, key_mask=km, is_causal=causal))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_default_bias_is_minus_log_lk_and_configurable():
    q, k, _ = _qkv(5, 32)
    w = attnreg.build("sigmoid").attention_weights(q, k)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    torch.testing.assert_close(w, torch.sigmoid(logits - math.log(32)))
    w0 = attnreg.build("sigmoid", bias=0.0).attention_weights(q, k)
    torch.testing.assert_close(w0, torch.sigmoid(logits))


def test_rows_are_not_normalised():
    q, k, _ = _qkv(6, 6)
    sums = attnreg.build("sigmoid").attention_weights(q, k).sum(-1)
    assert not torch.allclose(sums, torch.ones_like(sums))


def test_dropout_is_refused_not_ignored():
    with pytest.raises(UnsupportedFeatureError, match="sigmoid"):
        attnreg.build("sigmoid", dropout=0.1)


def test_decoding_matches_the_paper_formula_over_the_whole_sequence():
    """Prefill 4, two single tokens, a chunk of 5 (L=11) with left padding: the outputs equal the
    formula's causal outputs at L=11, whose default bias is -log(11) at every step."""
    q, k, v = _qkv(11, 11, seed=3)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[1, :3] = False  # item 1 is left-padded by 3
    attn = attnreg.build("sigmoid")
    state = attn.init_state(2, 3, 8, dtype=torch.float64, max_length=11)
    outs, pos = [], 0
    for t in (4, 1, 1, 5):
        out, state = attn.decode(q[:, :, pos:pos + t], k[:, :, pos:pos + t], v[:, :, pos:pos + t], state,
                                 key_mask=km[:, pos:pos + t])
        outs.append(out)
        pos += t
    want, _ = sigmoid_reference(q, k, v, Masks(2, 3, 11, 11, key_mask=km, is_causal=True))
    torch.testing.assert_close(torch.cat(outs, dim=2), want, rtol=1e-12, atol=1e-12)


def test_decoding_with_the_default_bias_needs_max_length():
    attn = attnreg.build("sigmoid")
    with pytest.raises(ValueError, match="max_length"):
        attn.init_state(2, 3, 8, dtype=torch.float64)
    # An explicit bias does not depend on the length: no max_length needed.
    q, k, v = _qkv(6, 6, seed=4)
    fixed = attnreg.build("sigmoid", bias=-1.5)
    out, _ = fixed.decode(q, k, v, fixed.init_state(2, 3, 8, dtype=torch.float64))
    torch.testing.assert_close(out, fixed(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)
