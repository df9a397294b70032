"""Every built-in inside tiny transformers models: a training step, and batched left-padded
greedy generation with transformers' cache equal to recomputing without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import BUILTINS, FIELDS, PAD, batch, build  # noqa: E402

from attnreg.core import UnsupportedFeatureError  # noqa: E402
from attnreg.integrations.transformers import CACHE_KWARG, AttnregCacheLayer, decoding_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 8


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: object):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, output_scores=True, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", BUILTINS)
def test_cached_generation_equals_recomputation(arch: str, variant: str) -> None:
    """Greedy tokens and every step's scores with the cache (the variant's decoding state per
    layer) equal generate(use_cache=False), which recomputes the whole padded batch each step."""
    model = build(arch, f"attnreg:{variant}", variant, dtype=torch.float64).eval()
    ids, mask = batch()
    cached = _generate(model, ids, mask)
    recomputed = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert cached.sequences.shape == (2, ids.shape[1] + NEW)
    for a, b in zip(cached.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    layers = getattr(cached, CACHE_KWARG).layers  # past_key_values before transformers 5.24
    assert all(isinstance(layer, AttnregCacheLayer) for layer in layers)
    assert layers[0].get_seq_length() == ids.shape[1] + NEW - 1  # the last token is never fed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", BUILTINS)
def test_training_step(arch: str, variant: str) -> None:
    """A padded batch, labels ignoring the padding: finite loss, finite gradients everywhere
    (the variant's own parameters included), and the optimizer step changes the model."""
    model = build(arch, f"attnreg:{variant}", variant).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = batch(length=11)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = model.lm_head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


@pytest.mark.parametrize("variant", ["local", "linear", "dot_product"])
def test_state_size_inside_transformers(variant: str) -> None:
    """local keeps O(window) and linear O(1) bytes per layer however long the sequence; the
    softmax KV cache grows with it."""
    model = build("llama", f"attnreg:{variant}", variant).eval()
    ids, mask = batch()
    sizes = []
    for new in (6, 14):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=PAD, return_dict_in_generate=True)
        sizes.append(getattr(out, CACHE_KWARG).layers[0].nbytes)
    if variant == "dot_product":
        assert sizes[1] > sizes[0]
    else:
        assert sizes[0] == sizes[1] > 0


def test_length_dependent_layout_decodes_the_pattern_of_the_total_length() -> None:
    """bigbird with random blocks (drawn per total length) and sparse with a length-derived
    stride: generate() sizes the states for prompt + new tokens, so the generated tokens are the
    greedy choices of one causal forward over the fed sequence (the pattern of that length)."""
    for variant, fields in (("bigbird", {"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 1}),
                            ("sparse", {"block_size": 2})):
        model = build("llama", f"attnreg:{variant}", variant, dtype=torch.float64, attnreg=fields).eval()
        ids, mask = batch()
        out = _generate(model, ids, mask)
        fed, p = out.sequences[:, :-1], ids.shape[1]  # the last token is never fed
        full_mask = torch.cat([mask, torch.ones(2, NEW - 1, dtype=mask.dtype)], 1)
        with torch.no_grad():
            logits = model(fed, attention_mask=full_mask).logits  # (B, P + NEW - 1, V)
        assert torch.equal(logits[:, p - 1:].argmax(-1), out.sequences[:, p:])


def test_explicit_decoding_cache_and_beam_search() -> None:
    """decoding_cache(model, max_length) gives the same tokens as generate()'s own cache; beam
    search (cache reordering, batch expansion) matches sdpa's beams with attnreg:dot_product."""
    model = build("llama", "attnreg:local", "local").eval()
    ids, mask = batch()
    own = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    cache = decoding_cache(model, max_length=ids.shape[1] + NEW)
    explicit = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=PAD, **{CACHE_KWARG: cache})
    assert torch.equal(own, explicit) and cache.layers[0].state.max_length == ids.shape[1] + NEW
    ref = build("llama", "sdpa", dtype=torch.float64).eval()
    ours = build("llama", "attnreg:dot_product", dtype=torch.float64).eval()
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
              pad_token_id=PAD)
    assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


@pytest.mark.parametrize("variant", ["linear", "local", "sparse"])
def test_forward_with_cache_and_decoding_cache_loop(variant: str) -> None:
    """A forward with use_cache=True keeps transformers' KV cache (the variant attends to its
    keys with lower-right causal alignment); a hand-made decoding_cache holds the variant's
    states. Both, fed a prompt then a chunk of 3 then one token, equal the full forward."""
    model = build("llama", f"attnreg:{variant}", variant, dtype=torch.float64).eval()
    ids, mask = batch(length=13)
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # (B, 13, V)
        for states in (False, True):
            cache, parts, end = decoding_cache(model) if states else None, [], 0
            for stop in (9, 12, 13):
                out = model(ids[:, end:stop], attention_mask=mask[:, :stop], use_cache=True,
                            **{CACHE_KWARG: cache})
                cache, end = getattr(out, CACHE_KWARG), stop
                parts.append(out.logits)
            assert [isinstance(layer, AttnregCacheLayer) for layer in cache.layers] == [states] * 2
            assert cache.get_seq_length() == 13
            torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], rtol=0, atol=1e-10)


def test_variant_fields_reach_the_layers() -> None:
    """The model config's attnreg dict configures every layer's variant."""
    model = build("gpt2", "attnreg:local", "local")
    attns = [m.attnreg for m in model.modules() if hasattr(m, "attnreg")]
    assert len(attns) == 2 and all(a.window == FIELDS["local"]["window"] for a in attns)


@pytest.mark.parametrize("arch", ["MistralConfig", "Qwen2Config", "Qwen3Config", "GemmaConfig", "PhiConfig"])
@pytest.mark.parametrize("variant", ["local", "linear"])
def test_other_decoder_architectures(arch: str, variant: str) -> None:
    """The attention modules of other transformers decoders are found, and cached generation
    equals recomputation there too. A model-side sliding window (Mistral's) is refused."""
    import transformers

    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=PAD, eos_token_id=None,
              max_position_embeddings=64, attnreg=FIELDS[variant])
    if arch == "PhiConfig":
        del kw["num_key_value_heads"], kw["head_dim"]
    ids, mask = batch()
    impl = f"attnreg:{variant}"
    if arch == "MistralConfig":
        cfg = transformers.MistralConfig(**kw, sliding_window=8)
        windowed = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
        with pytest.raises(UnsupportedFeatureError, match="sliding"):
            _generate(windowed, ids, mask)
        with pytest.raises(UnsupportedFeatureError, match="sliding"):
            windowed(ids, attention_mask=mask, use_cache=False)
        kw["sliding_window"] = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, arch)(**kw),
                                                          attn_implementation=impl).eval()
    assert sum(1 for m in model.modules() if hasattr(m, "attnreg")) == 2
    cached, recomputed = _generate(model, ids, mask), _generate(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert isinstance(getattr(cached, CACHE_KWARG).layers[0], AttnregCacheLayer)


@pytest.mark.parametrize("variant", BUILTINS)
def test_threads_generating_with_one_model(variant: str) -> None:
    """A served model: 6 threads generate at once with one model, each with its own cache (and
    prompt length); each result equals generating alone. The state layer of a call is the
    calling thread's, never another thread's."""
    import threading

    from threads import start_and_join

    model = build("llama", f"attnreg:{variant}", variant, dtype=torch.float64).eval()
    prompts = [batch(seed=s, length=5 + s) for s in range(6)]
    want = [_generate(model, *p).sequences for p in prompts]
    got: list[object] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        barrier.wait()
        try:
            got[i] = _generate(model, *prompts[i]).sequences
        except Exception as exc:  # noqa: BLE001 - reported below
            got[i] = exc

    start_and_join([threading.Thread(target=work, args=(i,)) for i in range(len(prompts))])
    for i, w in enumerate(want):
        assert isinstance(got[i], torch.Tensor) and torch.equal(got[i], w), (i, got[i])
