"""The transformers versions the integration supports: the range check, the cache keyword
detected at import (``past_key_values`` up to 5.23, ``cache`` from 5.24), and errors, never a
silent fallback to transformers' own KV cache, where that name is not the one in use."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import PAD, batch, build  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM  # noqa: E402

import attnreg.integrations.transformers as hf  # noqa: E402
from attnreg.integrations.transformers import _compat  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RANGE = re.escape(hf.SUPPORTED_TRANSFORMERS)
INSTALLED = tuple(int(p) for p in transformers.__version__.split(".")[:2])


def test_cache_keyword_is_the_installed_versions() -> None:
    """Detected from signatures, it is the name the installed models take and return."""
    assert hf.CACHE_KWARG == ("cache" if INSTALLED >= (5, 24) else "past_key_values")
    assert _compat.OTHER_CACHE_KWARG == ("past_key_values" if INSTALLED >= (5, 24) else "cache")
    for fn in (LlamaForCausalLM.forward, LlamaAttention.forward):
        assert hf.CACHE_KWARG in inspect.signature(fn).parameters
    out = build("llama", "attnreg:linear", "linear").eval()(batch()[0], use_cache=True)
    assert isinstance(out[hf.CACHE_KWARG], DynamicCache)


@pytest.mark.parametrize("version", ["5.23.0", "5.23.2", "5.24.0", "5.24.1.dev0"])
def test_supported_versions_pass_silently(version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_version(version)


@pytest.mark.parametrize("version", ["4.57.1", "5.0.0", "5.22.0"])
def test_older_versions_are_refused_naming_the_range(version: str) -> None:
    with pytest.raises(ImportError, match=f"{RANGE}.*found {re.escape(version)}"):
        _compat.check_version(version)


@pytest.mark.parametrize("version", ["5.25.0", "6.0.0"])
def test_newer_versions_warn_naming_the_range(version: str) -> None:
    with pytest.warns(UserWarning, match=f"{RANGE}.*found {re.escape(version)}.*untested"):
        _compat.check_version(version)


def test_detection_refuses_signatures_that_do_not_name_one_keyword(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformers whose mask function names both keywords, neither, or the other one than
    generate and the outputs do is refused at import, naming the supported range."""
    def both(config, inputs_embeds, attention_mask, cache, past_key_values=None): ...  # noqa: ANN001, ANN202
    def neither(config, inputs_embeds, attention_mask, kv=None): ...  # noqa: ANN001, ANN202
    other = {}
    exec(f"def other(config, {_compat.OTHER_CACHE_KWARG}=None): ...", other)  # the other version's name
    for fake, why in ((both, "names both"), (neither, "names neither"), (other["other"], "differently")):
        monkeypatch.setattr(_compat, "create_causal_mask", fake)
        with pytest.raises(ImportError, match=f"{RANGE}.*{why}"):
            _compat.detect_cache_kwarg()
    monkeypatch.undo()
    assert _compat.detect_cache_kwarg() == hf.CACHE_KWARG


def test_cache_under_the_other_keyword_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate()'s cache preparation storing the cache under the other version's key, or an
    attention module handed the cache under it, raise instead of running on transformers' KV
    cache (what the 5.23 integration silently did on 5.24)."""
    model = build("llama", "attnreg:local", "local").eval()
    ids, mask = batch()

    def prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):  # noqa: ANN001, ANN202
        model_kwargs[_compat.OTHER_CACHE_KWARG] = DynamicCache(config=self.config)

    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "_prepare_cache_for_generation", prepare)
        with pytest.raises(RuntimeError, match=f"{_compat.OTHER_CACHE_KWARG}.*{RANGE}"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    attn, hidden = next(hf.attention_modules(model)), torch.randn(2, 9, 32)  # (B, L, hidden)
    rope = model.model.rotary_emb(hidden, torch.arange(9)[None])
    with pytest.raises(ValueError, match=f"as {_compat.OTHER_CACHE_KWARG}=.*{RANGE}"):
        attn(hidden, position_embeddings=rope, attention_mask=None,
             **{_compat.OTHER_CACHE_KWARG: hf.decoding_cache(model)})


@pytest.mark.skipif(hf.CACHE_KWARG != "cache", reason="transformers 5.24's deprecated keyword")
def test_deprecated_past_key_values_still_reaches_the_states() -> None:
    """On 5.24 generate(past_key_values=...) and model(past_key_values=...) still work (with
    transformers' FutureWarning): the hand-made decoding states are used."""
    model = build("llama", "attnreg:local", "local").eval()
    ids, mask = batch()
    own = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    cache = hf.decoding_cache(model, max_length=ids.shape[1] + 4)
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                             past_key_values=cache)
    assert torch.equal(own, old) and cache.layers[0].state is not None
    assert cache.get_seq_length() == ids.shape[1] + 3
    with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
        fresh = hf.decoding_cache(model)
        model(ids, attention_mask=mask, past_key_values=fresh, use_cache=True)
    assert isinstance(fresh.layers[0], hf.AttnregCacheLayer) and fresh.get_seq_length() == ids.shape[1]


def test_init_weights_of_a_partly_loaded_variant_with_grad_enabled() -> None:
    """transformers 5.24 dropped the no_grad of ``_init_weights``: called directly, with grad
    enabled, it still resets the variant's unloaded parameters and keeps the loaded one."""
    model = build("llama", "attnreg:additive", "additive")
    attn = next(hf.attention_modules(model)).attnreg
    params = dict(attn.named_parameters())
    assert len(params) > 1 and all(p.requires_grad for p in params.values())
    loaded_name, loaded = next(iter(params.items()))
    with torch.no_grad():
        for p in params.values():
            p.fill_(7.0)
    loaded._is_hf_initialized = True
    assert torch.is_grad_enabled()
    model._init_weights(attn)
    assert torch.all(loaded == 7.0)
    for name, p in params.items():
        if name != loaded_name:
            assert not torch.all(p == 7.0), name
