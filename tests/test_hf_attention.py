"""Inside a transformers model: attnreg:dot_product computes what sdpa does; what each variant
is handed (masks, heads, dropout, scaling); learnable parameters live with the model."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import PAD, batch, build  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import attnreg.integrations.transformers as hf  # noqa: E402
from attnreg.core import UnsupportedFeatureError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dot_product_equals_sdpa(arch: str) -> None:
    """fp32 logits at every real position (left padding; Llama grouped-query, GPT-2 per-layer
    scaling) within 1e-5, and the same greedy tokens."""
    ref, ours = build(arch, "sdpa").eval(), build(arch, "attnreg:dot_product").eval()
    assert not any(k.startswith("attnreg") for k in ours.state_dict())  # same weights, nothing added
    ids, mask = batch()
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits  # (B, L, V)
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], rtol=0, atol=1e-5)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


def _record(model: torch.nn.Module) -> list[dict]:
    """Every call of the attached variants: the key heads, masks and dropout they were given."""
    calls: list[dict] = []

    def hook(attn, args, kwargs):
        calls.append({"key_heads": args[1].shape[1], "attn_mask": kwargs.get("attn_mask"),
                      "key_mask": kwargs.get("key_mask"), "is_causal": kwargs.get("is_causal"),
                      "dropout": attn.active_dropout, "scale": attn.scale})

    for m in hf.attention_modules(model):
        m.attnreg.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize(("variant", "key_heads"), [("dot_product", 2), ("linear", 4), ("additive", 4)])
def test_variants_get_causal_and_key_mask_not_a_dense_mask(variant: str, key_heads: int) -> None:
    """The 2-D padding mask becomes key_mask (B, L), causality is_causal=True: no (L, L) mask.
    Grouped-query key/value heads reach variants declaring grouped_query as they are (2), the
    others repeated to the query's 4."""
    model = build("llama", f"attnreg:{variant}").eval()
    calls = _record(model)
    ids, mask = batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones_like(mask))
    padded, full = calls[0], calls[2]
    assert padded["attn_mask"] is None and padded["is_causal"] is True
    assert torch.equal(padded["key_mask"], mask.bool())
    assert full["key_mask"] is None and full["attn_mask"] is None  # nothing padded: the unmasked path
    assert {c["key_heads"] for c in calls} == {key_heads}


def test_packed_sequences_give_a_dense_mask() -> None:
    """Packed sequences (position_ids restarting, no padding mask) need the block-diagonal
    pattern: variants taking attn_mask get transformers' dense mask and match sdpa; linear,
    which takes none, raises instead of attending across sequences."""
    ids, _ = batch(pads=(0,))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # two sequences in one row
    ref, ours = build("llama", "sdpa").eval(), build("llama", "attnreg:dot_product").eval()
    calls = _record(ours)
    with torch.no_grad():
        a = ref(ids, position_ids=pos, use_cache=False).logits  # (a cache turns packing detection off)
        b = ours(ids, position_ids=pos, use_cache=False).logits
        unpacked = ours(ids, use_cache=False).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert not torch.allclose(b[:, 4:], unpacked[:, 4:])  # the second sequence does not see the first
    assert calls[0]["attn_mask"].shape == (1, 1, 9, 9) and calls[0]["is_causal"] is False
    with pytest.raises(UnsupportedFeatureError, match="attn_mask"):
        build("llama", "attnreg:linear").eval()(ids, position_ids=pos, use_cache=False)


def test_dropout_and_scaling_come_from_the_model_per_call() -> None:
    """The model's attention dropout in training mode, 0 in eval; GPT-2's per-layer scaling."""
    model = build("llama", "attnreg:dot_product", attention_dropout=0.25)
    calls = _record(model)
    ids, mask = batch()
    model.train()(ids, attention_mask=mask)
    with torch.no_grad():
        model.eval()(ids, attention_mask=mask)
    assert [c["dropout"] for c in calls] == [0.25, 0.25, 0.0, 0.0]
    assert {c["scale"] for c in calls} == {8 ** -0.5}
    gpt2 = build("gpt2", "attnreg:local")
    calls = _record(gpt2)
    with torch.no_grad():
        gpt2(ids, attention_mask=mask)
    assert [c["scale"] for c in calls] == [8 ** -0.5 / 1, 8 ** -0.5 / 2]  # scale_attn_by_inverse_layer_idx


def test_learnable_parameters_exist_with_the_model_and_round_trip(tmp_path) -> None:
    """additive's per-head parameters are in state_dict and parameters() from construction on,
    and save_pretrained / from_pretrained restore them."""
    model = build("llama", "attnreg:additive").eval()
    names = [k for k in model.state_dict() if ".attnreg." in k]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.attnreg.{p}" for i in range(2)
                                   for p in ("w_q", "w_k", "b", "v"))
    opt = torch.optim.AdamW(model.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(model.get_parameter(n)) in in_opt for n in names)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnreg:additive").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_checkpoint_without_the_variant_parameters_initialises_them(tmp_path) -> None:
    """Loading a checkpoint saved with sdpa as attnreg:additive: the model's weights are loaded,
    the missing additive parameters get the variant's own initialisation (not empty memory)."""
    ref = build("llama", "sdpa")
    ref.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnreg:additive")
    theirs = ref.state_dict()
    for k, v in model.state_dict().items():
        if ".attnreg." in k:
            bound = 1 / math.sqrt(8)  # reset_parameters: U(-1/sqrt(E), 1/sqrt(E)), E = d_a = 8
            assert v.abs().max() <= bound and v.std() > bound / 4, k
        else:
            assert torch.equal(v, theirs[k]), k
