"""``attnreg.MultiHeadAttention``: equality with ``torch.nn.MultiheadAttention``, the config forms
of ``attention``, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnreg
from attnreg.core import ConfigError, UnknownVariantError

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, B, L, S = 16, 4, 3, 7, 9
F64 = torch.float64


def _torch_mha(bias: bool = True, **kw) -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(D, H, batch_first=True, bias=bias, dtype=F64, **kw)
    with torch.no_grad():  # torch zeroes the biases at init: make them count
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return t


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _right_pad(length: int) -> torch.Tensor:
    """torch's key_padding_mask (B, length): True = ignore. Right padding: no row is empty."""
    ignore = torch.zeros(B, length, dtype=torch.bool)
    ignore[1, -2:] = True
    ignore[2, -4:] = True
    return ignore


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "causal", "causal+key_padding",
                                   "bool_attn_mask", "float_attn_mask"])
def test_equals_torch_multihead_attention(bias: bool, masks: str) -> None:
    t = _torch_mha(bias)
    ours = attnreg.MultiHeadAttention.from_torch(t)
    x = _x(B, L, D)
    theirs_kw: dict = {}
    ours_kw: dict = {}
    if "key_padding" in masks:
        theirs_kw["key_padding_mask"] = _right_pad(L)
        ours_kw["key_mask"] = ~_right_pad(L)  # attnreg: True = real token
    if "causal" in masks:
        theirs_kw["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)  # torch: True = blocked
        ours_kw["is_causal"] = True
    if masks == "bool_attn_mask":
        blocked = torch.rand(L, L, generator=torch.Generator().manual_seed(3)) < 0.3
        blocked.fill_diagonal_(False)  # no empty row (torch gives NaN there)
        theirs_kw["attn_mask"], ours_kw["attn_mask"] = blocked, ~blocked
    if masks == "float_attn_mask":
        theirs_kw["attn_mask"] = ours_kw["attn_mask"] = _x(L, L, seed=4)
    ref, ref_w = t(x, x, x, need_weights=True, average_attn_weights=False, **theirs_kw)
    out, w = ours(x, need_weights=True, **ours_kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_equals_torch_cross_attention_with_kdim_vdim(bias: bool) -> None:
    t = _torch_mha(bias, kdim=6, vdim=5)
    ours = attnreg.MultiHeadAttention.from_torch(t)
    assert (ours.kdim, ours.vdim) == (6, 5)
    q, k, v = _x(B, L, D), _x(B, S, 6, seed=2), _x(B, S, 5, seed=3)
    ref, _ = t(q, k, v, key_padding_mask=_right_pad(S))
    torch.testing.assert_close(ours(q, k, v, key_mask=~_right_pad(S)), ref, rtol=0, atol=1e-12)


def test_equals_torch_cross_attention_same_dims_and_backward() -> None:
    t = _torch_mha()
    ours = attnreg.MultiHeadAttention.from_torch(t)
    q, kv = _x(B, L, D).requires_grad_(), _x(B, S, D, seed=2).requires_grad_()
    ref, _ = t(q, kv, kv)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), (q, kv, t.in_proj_weight))
    out = ours(q, kv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.autograd.grad(out.pow(2).sum(), (q, kv, ours.q_proj.weight, ours.k_proj.weight,
                                               ours.v_proj.weight))
    torch.testing.assert_close(g[0], g_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(g[1], g_ref[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(g[2:]), g_ref[2], rtol=0, atol=1e-12)


def test_from_torch_copies_dropout_device_dtype_and_rejects_extras() -> None:
    t = torch.nn.MultiheadAttention(D, H, dropout=0.25, batch_first=False, dtype=F64)
    ours = attnreg.MultiHeadAttention.from_torch(t)
    assert ours.attention.config.dropout == 0.25 and ours.q_proj.weight.dtype == F64
    local = attnreg.MultiHeadAttention.from_torch(t, attention={"variant": "local", "window": 2})
    assert local.variant == "local"
    with pytest.raises(ValueError, match="add_bias_kv"):
        attnreg.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(D, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="differ"):
        attnreg.MultiHeadAttention(D, 2).load_torch_weights(t)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        attnreg.MultiHeadAttention.from_torch(torch.nn.Linear(D, D))  # type: ignore[arg-type]


def test_default_init_matches_torch_bounds() -> None:
    torch.manual_seed(0)
    mha = attnreg.MultiHeadAttention(D, H)
    bound = (6.0 / (D + 3 * D)) ** 0.5  # Xavier over torch's stacked (3D, D) in_proj_weight
    for lin in (mha.q_proj, mha.k_proj, mha.v_proj):
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
        assert torch.equal(lin.bias, torch.zeros(D))
    assert torch.equal(mha.out_proj.bias, torch.zeros(D))


# -- the attention argument ----------------------------------------------------------------
def test_every_config_form_builds_the_same_module(tmp_path) -> None:
    path = tmp_path / "attention.yaml"  # a config file needs no sizes: the module fills them in
    path.write_text("variant: bahdanau\nhidden_dim: 5\n")
    forms = ["additive", {"variant": "additive", "hidden_dim": 5}, path,
             attnreg.validate_config({"variant": "additive", "num_heads": H, "head_dim": D // H})]
    mods = []
    for form in forms:
        torch.manual_seed(0)
        mods.append(attnreg.MultiHeadAttention(D, H, attention=form))
    for m in mods:
        assert (m.attention.num_heads, m.attention.head_dim) == (H, D // H)
    assert mods[1].attention.config == mods[2].attention.config
    assert mods[1].attention.w_q.shape == (H, D // H, 5)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(mods[0](x), mods[3](x), rtol=0, atol=0)


@pytest.mark.parametrize("attention", [
    {"variant": "additive", "num_heads": 2},
    {"variant": "additive", "head_dim": 8},
    {"variant": "sparse", "num_heads": 8},
])
def test_conflicting_sizes_in_the_config_raise(attention: dict) -> None:
    field = next(k for k in attention if k != "variant")
    with pytest.raises(ConfigError, match=f"sets {field}=.*drop {field}"):
        attnreg.MultiHeadAttention(D, H, attention=attention)
    model = attnreg.validate_config({"variant": "additive", "num_heads": 2, "head_dim": 8})
    with pytest.raises(ConfigError, match="num_heads=2"):
        attnreg.MultiHeadAttention(D, H, attention=model)


def test_bad_attention_argument() -> None:
    with pytest.raises(UnknownVariantError, match="dot_prodcut"):
        attnreg.MultiHeadAttention(D, H, attention="dot_prodcut")
    with pytest.raises(ConfigError, match="variant"):
        attnreg.MultiHeadAttention(D, H, attention={"window": 3})
    with pytest.raises(ConfigError, match="window"):
        attnreg.MultiHeadAttention(D, H, attention={"variant": "local", "window": -1})
    with pytest.raises(ConfigError, match="AttentionConfig"):
        attnreg.MultiHeadAttention(D, H, attention=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot read config file"):
        attnreg.MultiHeadAttention(D, H, attention=Path("no/such/attention.yaml"))


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"embed_dim": 10, "num_heads": 4}, "divisible by num_heads"),
    ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"embed_dim": 16, "num_heads": 0}, "num_heads must be an integer >= 1"),
    ({"embed_dim": 16, "num_heads": 4, "kdim": 0}, "kdim"),
])
def test_bad_sizes_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attnreg.MultiHeadAttention(**kw)


def test_bad_inputs_raise() -> None:
    mha = attnreg.MultiHeadAttention(D, H, dtype=F64)
    x = _x(B, L, D)
    with pytest.raises(ValueError, match=r"query must be a tensor \(B, L, 16\).*\(B, L, H, E\)"):
        mha(x.view(B, L, H, D // H))
    with pytest.raises(ValueError, match=r"\(B, L, 16\), got \(3, 7, 12\)"):
        mha(x[..., :12])
    with pytest.raises(ValueError, match="key has batch 2"):
        mha(x, x[:2])
    with pytest.raises(ValueError, match="value length 5 differs from key length 7"):
        mha(x, x, x[:, :5])
    with pytest.raises(ValueError, match="value was given without key"):
        mha(x, value=x)
    with pytest.raises(ValueError, match="torch.float32"):
        mha(x.float())
    with pytest.raises(ValueError, match="key_mask"):
        mha(x, key_mask=torch.ones(B, L + 1, dtype=torch.bool))
    state = mha.init_state(B)
    with pytest.raises(ValueError, match="x has batch 2, the state 3"):
        mha.decode(x[:2, :1], state)
    with pytest.raises(ValueError, match=r"x must be a tensor \(B, L, 16\)"):
        mha.decode(x[:, :1].view(B, 1, H, D // H), state)
    with pytest.raises(ValueError, match="max_length 4"):
        mha.decode(x[:, :5], mha.init_state(B, max_length=4))
