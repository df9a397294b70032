"""attnreg.integrations.transformers: the optional import, key registration, and where a
layer's variant config comes from."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import PAD, batch, build, llama_config  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import attnreg  # noqa: E402
import attnreg.integrations.transformers as hf  # noqa: E402
from attnreg.core import ConfigError, UnknownVariantError, UnsupportedFeatureError  # noqa: E402
from attnreg.integrations.transformers._cache import forget_cache  # noqa: E402
from attnreg.plugins.dot_product import DotProductAttention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_import_attnreg_never_imports_transformers() -> None:
    res = _run("""
        import sys, torch, attnreg
        attnreg.build("local", window=4)(*(torch.randn(1, 2, 5, 4),) * 3, is_causal=True)
        attnreg.MultiHeadAttention(8, num_heads=2)
        assert "transformers" not in sys.modules, "attnreg imported transformers"
    """)
    assert res.returncode == 0, res.stderr


def test_integration_without_transformers_names_the_extra() -> None:
    res = _run("""
        import sys
        sys.modules["transformers"] = None  # what an environment without transformers looks like
        import attnreg.integrations.transformers
    """)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "pip install 'attnreg[hf]'" in res.stderr


def test_every_registered_variant_has_a_key_in_both_interfaces() -> None:
    keys = hf.registered_keys()
    for name in attnreg.list_variants():
        key = f"attnreg:{name}"
        assert keys[key].variant == name
        assert AttentionInterface._global_mapping[key] is hf.attention_forward
        assert AttentionMaskInterface._global_mapping[key] is hf.mask_interface
    assert keys["attnreg"].variant is None


class _Toy(DotProductAttention):  # a third-party variant: softmax attention renamed, no decoding
    variant = "toy_softmax"
    capabilities = dataclasses.replace(DotProductAttention.capabilities, decoding=False)


def test_third_party_plugin_registered_at_runtime() -> None:
    """A plugin registered after the import gets its key from register(), and runs like sdpa.
    It declares no decoding: generate() with a cache says to use use_cache=False, which works."""
    from typing import Literal

    from pydantic import Field

    class Cfg(attnreg.AttentionConfig):
        variant: Literal["toy_softmax"] = Field("toy_softmax", description="name")

    spec = attnreg.VariantSpec(name="toy_softmax", config=Cfg, factory=_Toy, capabilities=_Toy.capabilities,
                               summary="test", reference="none")
    attnreg.register(spec)
    try:
        assert "attnreg:toy_softmax" in hf.register()
        ids, mask = batch()
        ref = build("llama", "sdpa").eval()
        toy = build("llama", "attnreg:toy_softmax").eval()
        with torch.no_grad():
            a, b = ref(ids, attention_mask=mask).logits, toy(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=0, atol=1e-5)
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        with pytest.raises(UnsupportedFeatureError, match="use_cache=False"):
            toy.generate(ids, **kw)
        assert torch.equal(toy.generate(ids, use_cache=False, **kw), ref.generate(ids, **kw))
    finally:
        attnreg.unregister("toy_softmax")
        for mapping in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping):
            mapping.pop("attnreg:toy_softmax", None)
        hf._keys._KEYS.pop("attnreg:toy_softmax", None)


@pytest.fixture
def local5():
    """attnreg:local5 = local with window 5 (a registration call with explicit fields)."""
    keys = hf.register("local", key="attnreg:local5", window=5)
    yield keys[0]
    for mapping in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping):
        mapping.pop("attnreg:local5", None)
    hf._keys._KEYS.pop("attnreg:local5", None)


def _variants(model: torch.nn.Module) -> list:
    return [m.attnreg for m in hf.attention_modules(model)]


def test_config_from_registration_and_model_config(local5: str) -> None:
    cfg = llama_config(attnreg={"block_size": 8})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=local5)
    assert [(a.variant, a.window, a.config.block_size) for a in _variants(model)] == [("local", 5, 8)] * 2
    model = AutoModelForCausalLM.from_config(llama_config(attnreg={"window": 5, "variant": "sliding_window"}),
                                             attn_implementation=local5)
    assert _variants(model)[0].window == 5  # a field given both ways may agree; an alias names the variant
    bare = AutoModelForCausalLM.from_config(llama_config(attnreg={"variant": "additive", "hidden_dim": 6}),
                                            attn_implementation="attnreg")
    got = [(a.variant, a.num_heads, a.head_dim, a.hidden_dim) for a in _variants(bare)]
    assert got == [("additive", 4, 8, 6)] * 2  # sizes filled in from the layer


@pytest.mark.parametrize(("impl", "fields", "match"), [
    ("attnreg:local5", {"window": 7}, "disagree on window"),
    ("attnreg:local", {"variant": "linear"}, "selects 'local' but"),
    ("attnreg", {"window": 3}, "takes the variant from the model config"),
    ("attnreg:local", {"dropout": 0.1}, "transformers decides"),
    ("attnreg:dot_product", {"scale": 0.5}, "transformers decides"),
    ("attnreg:additive", {"num_heads": 8}, "num_heads=8"),
    ("attnreg:local", {"windw": 3}, "windw"),
])
def test_config_errors_name_the_problem(local5: str, impl: str, fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AutoModelForCausalLM.from_config(llama_config(attnreg=fields), attn_implementation=impl)


def test_register_errors() -> None:
    with pytest.raises(UnknownVariantError):
        hf.register("no_such_variant")
    with pytest.raises(ValueError, match="start with 'attnreg:'"):
        hf.register("local", key="local5")
    with pytest.raises(ValueError, match="need a variant name"):
        hf.register(window=3)
    with pytest.raises(ConfigError, match="transformers decides"):
        hf.register("local", key="attnreg:x", dropout=0.1)
    with pytest.raises(ConfigError, match="window"):
        hf.register("local", key="attnreg:x", window=-1)
    assert "attnreg:x" not in hf.registered_keys()


def test_set_attn_implementation_then_attach() -> None:
    """A model built with sdpa and switched afterwards: parameter-free variants attach on first
    use; learnable ones must be attached before training (an error names attach)."""
    ids, mask = batch()
    model = build("llama", "sdpa").eval()
    model.set_attn_implementation("attnreg:local")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert all(a.variant == "local" for a in _variants(model))
    model.set_attn_implementation("attnreg:additive")
    with pytest.raises(RuntimeError, match=r"attach\(model\)"):
        model(ids, attention_mask=mask)
    assert hf.attach(model) == 2 and hf.attach(model) == 0
    assert sum("attnreg.w_q" in k for k in model.state_dict()) == 2
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_unsupported_uses_raise() -> None:
    """Dropout for a variant without it, cropping a decoding state, a static cache, model-side
    soft-capping."""
    ids, mask = batch()
    model = build("llama", "attnreg:linear", attention_dropout=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match="attention dropout"):
        model(ids, attention_mask=mask)
    model.eval()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD, do_sample=False,
                         return_dict_in_generate=True)
    with pytest.raises(UnsupportedFeatureError, match="cropping"):
        getattr(out, hf.CACHE_KWARG).crop(-1)
    with pytest.raises(UnsupportedFeatureError, match="StaticCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD,
                       cache_implementation="static")
    def lose_state_layer(module: torch.nn.Module, args: tuple) -> None:  # as if the hook found no cache
        forget_cache(module, args, None)

    cache = hf.decoding_cache(model)
    next(hf.attention_modules(model)).register_forward_pre_hook(lose_state_layer)
    with pytest.raises(RuntimeError, match="never decoded"):  # an update whose attention never came
        with torch.no_grad():
            kw = {"attention_mask": mask, "use_cache": True, hf.CACHE_KWARG: cache}
            model(ids, **kw)  # silently cacheless...
            model(ids[:, -1:], **kw)  # ...then caught
    attn_module = next(hf.attention_modules(model))
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(UnsupportedFeatureError, match="soft-capping"):
        hf.attention_forward(attn_module, q, q, q, None, softcap=30.0)


def test_docs_snippets_run() -> None:
    """The README's transformers snippet and the docs page's usage and decoding_cache snippets."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = [c for c in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
              if "attnreg.integrations.transformers" in c]
    page = re.findall(r"```python\n(.*?)```", (root / "docs" / "transformers.md").read_text(), flags=re.S)
    assert len(readme) == 1 and len(page) == 2
    ns: dict = {}
    exec(compile(readme[0], "README.md", "exec", dont_inherit=True), ns)
    assert [a.window for a in _variants(ns["model"])] == [64] * 4
    ns = {}
    for code in page:
        exec(compile(code, "docs/transformers.md", "exec", dont_inherit=True), ns)
    assert ns["out"].shape == (2, 12 + 20)
    assert ns["cache"].get_seq_length() == 12 + 20 - 1
