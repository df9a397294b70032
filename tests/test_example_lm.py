"""The tiny LM of examples/tiny_lm: greedy generation with the decoding state gives exactly the
tokens of recomputing the whole sequence at every step, for every registered variant that
declares decoding (left-padded batch); a short training run lowers the loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import attnreg

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_lm"
sys.path.insert(0, str(EXAMPLE))
import tiny_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTINS = ("dot_product", "additive", "local", "linear", "performer", "sparse", "bigbird")
SIZES = {"vocab_size": 12, "dim": 32, "num_heads": 4, "num_kv_heads": 2, "num_layers": 2, "max_len": 24}


def _decoding_cases() -> list:
    out = []
    for name in attnreg.list_variants():
        spec = attnreg.get_variant(name)
        if not spec.capabilities.decoding:
            continue
        out.append(pytest.param(name, {}, id=name))
        if spec.check_configs:  # small blocks/windows: several of them within the tiny sequence
            over = dict(spec.check_configs[0])
            tag = ",".join(f"{k}={v}" for k, v in over.items())
            out.append(pytest.param(name, over, id=f"{name}[{tag}]"))
    return out


_TRAINED: dict[str, dict[str, torch.Tensor]] = {}


def _model(name: str, over: dict | None = None) -> tiny_lm.TinyLM:
    """A float64 model with ``name``'s attention, briefly trained (once per variant; its check
    configs reuse the weights). A random model greedily repeats one token, which would make the
    equality checks nearly vacuous; a trained one continues the prompts' patterns."""
    torch.manual_seed(0)
    model = tiny_lm.TinyLM(**SIZES, attention={"variant": name, **(over or {})})
    if name not in _TRAINED:
        tiny_lm.train(model, steps=30, batch_size=16, seq_len=16, lr=1e-2, seed=0)
        _TRAINED[name] = model.state_dict()
    model.load_state_dict(_TRAINED[name])
    return model.double().eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    rows = tiny_lm.make_batch(3, 9, SIZES["vocab_size"], torch.Generator().manual_seed(5))
    return tiny_lm.left_pad([rows[0], rows[1, :6], rows[2, :3]])  # (3, 9): 0, 3, 6 pads on the left


@pytest.mark.parametrize("name,over", _decoding_cases())
def test_generation_with_state_equals_recomputation(name: str, over: dict) -> None:
    model = _model(name, over)
    prompt, real = _prompts()
    fast = tiny_lm.generate(model, prompt, real, max_new_tokens=10)
    slow = tiny_lm.generate_without_state(model, prompt, real, max_new_tokens=10)
    assert fast.shape == (3, 10)
    assert len(set(slow.flatten().tolist())) >= 3, f"degenerate generation {slow.tolist()}"
    assert torch.equal(fast, slow), f"{name}: with state {fast.tolist()} != recomputed {slow.tolist()}"


def test_every_builtin_declares_decoding() -> None:
    missing = [n for n in BUILTINS if not attnreg.get_variant(n).capabilities.decoding]
    assert not missing, f"built-ins without decoding: {missing}"


def test_left_padding_changes_nothing_with_dot_product() -> None:
    """Positions count real tokens only: each padded row generates what its prompt alone does."""
    model = _model("dot_product")
    prompt, real = _prompts()
    batch = tiny_lm.generate(model, prompt, real, max_new_tokens=8)
    for i in range(3):
        alone = prompt[i, real[i]][None]  # (1, P_i)
        assert torch.equal(batch[i], tiny_lm.generate(model, alone, max_new_tokens=8)[0])
    assert len(set(batch.flatten().tolist())) >= 3  # a non-degenerate check


def test_short_training_lowers_the_loss() -> None:
    cfg = tiny_lm.load_config()  # the example's own config.yaml (its attention variant)
    torch.manual_seed(0)
    model = tiny_lm.build_model(cfg)
    assert model.blocks[0].attn.variant == attnreg.get_variant(cfg["attention"]["variant"]).name
    losses = tiny_lm.train(model, steps=60, batch_size=16, seq_len=24, lr=1e-2, seed=0)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # ln(11) = 2.40 is the loss of guessing the pattern tokens uniformly: well below it, the
    # model copies from one period earlier.
    chance = math.log(cfg["model"]["vocab_size"] - 1)
    assert last < 0.8 * chance and last < 0.8 * first, (first, last)


def test_generate_rejects_bad_prompts() -> None:
    model = _model("dot_product")
    prompt, real = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        tiny_lm.generate(model, prompt, real.flip(1))
    with pytest.raises(ValueError, match="exceed max_len 24"):
        tiny_lm.generate(model, prompt, real, max_new_tokens=20)
