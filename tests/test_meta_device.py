"""The ``meta`` device: shape inference without memory, how large models are built.

The conformance check ``meta_device`` holds every registered variant to "the right shape and
dtype on meta, or ``UnsupportedFeatureError`` naming meta"; the built-ins all support it. Here:
whole ``MultiHeadAttention`` modules built under ``with torch.device("meta")`` (every tensor a
variant creates without an explicit device lands on meta there), for every registered variant.
"""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg._plugins import BUILTIN_DIST, REGISTRY
from attnreg.conformance import run_check
from attnreg.core import UnsupportedFeatureError

BUILTINS = [n for n in attnreg.list_variants() if REGISTRY.provider(n).split(" ")[0] == BUILTIN_DIST]


@pytest.mark.parametrize("variant", BUILTINS)
def test_builtins_run_on_meta(variant: str) -> None:
    """Built-ins never take the ``UnsupportedFeatureError`` way out of ``meta_device``."""
    spec = attnreg.get_variant(variant)
    for overrides in [None, *spec.check_configs]:
        run_check(spec, "meta_device", overrides=overrides)
    m = attnreg.build(variant, **({"num_heads": 2, "head_dim": 8} if variant == "additive" else {}))
    q = torch.empty(2, 2, 5, 8, device="meta")
    assert m.to("meta")(q, q, q).device.type == "meta"  # no UnsupportedFeatureError


@pytest.mark.parametrize("variant", attnreg.list_variants())
def test_model_built_under_meta_device(variant: str) -> None:
    """``MultiHeadAttention`` built and run under ``with torch.device("meta")``: forward (causal
    with padding, plain) and, where declared, decoding return meta tensors of the right shape,
    or the variant raises ``UnsupportedFeatureError`` naming meta."""
    caps = attnreg.get_variant(variant).capabilities
    try:
        with torch.device("meta"):
            mha = attnreg.MultiHeadAttention(32, 4, attention=variant)
            x = torch.empty(2, 37, 32)
            km = torch.ones(2, 37, dtype=torch.bool)
            outs = [mha(x)]
            if caps.causal and caps.key_mask:
                outs.append(mha(x, is_causal=True, key_mask=km))
            if caps.decoding:
                state = mha.init_state(2, max_length=40)
                _, state = mha.decode(x[:, :5], state, key_mask=km[:, :5] if caps.key_mask else None)
                outs.append(mha.decode(x[:, 5:6], state)[0])
    except UnsupportedFeatureError as err:
        assert "meta" in str(err), f"{variant}: UnsupportedFeatureError on meta without naming it: {err}"
        return
    for out in outs:
        assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape[0] == 2
        assert tuple(out.shape[2:]) == (32,) and out.shape[1] in (1, 37)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", BUILTINS)
def test_builtins_backward_on_meta(variant: str, causal: bool) -> None:
    """Backward on meta (a training step's shapes) passes through the built-ins' data-dependent
    fast-path decisions (finite checks, normaliser floor, dead rows), which take their general
    branch there: the gradients are meta tensors of the inputs' shapes."""
    sizes = {"num_heads": 2, "head_dim": 8} if variant == "additive" else {}
    m = attnreg.build(variant, **sizes).to("meta")
    q, k, v = (torch.empty(2, 2, 13, 8, device="meta", dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    km = torch.ones(2, 13, dtype=torch.bool, device="meta")
    m(q, k, v, is_causal=causal, key_mask=km).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.device.type == "meta" and t.grad.shape == t.shape
