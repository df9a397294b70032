"""Decoding states record the variant and the config fields they depend on: ``decode`` refuses a
state made by a module of another variant or with other values of those fields, and accepts one
from another module of the same variant and fields."""

from __future__ import annotations

import pytest
import torch

import attnreg

B, H, E = 2, 2, 4
F64 = torch.float64


def _step(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, 1, E, generator=g, dtype=F64) for _ in range(3))  # type: ignore[return-value]


def _state(name: str, **cfg: object):
    attn = attnreg.build(name, **cfg)
    state = attn.init_state(B, H, E, dtype=F64, max_length=16)
    _, state = attn.decode(*_step(1), state)  # a state that holds something
    return state


# (module that decodes, state maker, words the error must contain)
FOREIGN = [
    (("performer", {"num_features": 8, "seed": 0}), ("performer", {"num_features": 8, "seed": 1}),
     ("performer (", "seed=0", "seed=1")),
    (("performer", {"num_features": 8}), ("linear", {"feature_map": "favor", "num_features": 8}),
     ("made by linear",)),
    (("linear", {"feature_map": "relu"}), ("linear", {}), ("feature_map='relu'", "feature_map='elu'")),
    (("performer", {"num_features": 8, "scale": 0.5}), ("performer", {"num_features": 8}), ("scale=0.5",)),
    (("bigbird", {"block_size": 4}), ("sparse", {"block_size": 4}), ("bigbird (", "made by sparse")),
    (("sparse", {"block_size": 4, "stride": 2}), ("sparse", {"block_size": 4, "stride": 3}),
     ("stride=2", "stride=3")),
    (("sparse", {"block_size": 4, "layout": "fixed", "stride": 2, "c": 2}),
     ("sparse", {"block_size": 4, "layout": "fixed", "stride": 2, "c": 1}), ("c=2", "c=1")),
    (("bigbird", {"block_size": 4, "seed": 1}), ("bigbird", {"block_size": 4}), ("seed=1", "seed=0")),
    (("sparse", {"block_size": 4, "layout": "custom", "custom_blocks": [[0, 0], [1, 1], [2, 2], [3, 3]]}),
     ("sparse", {"block_size": 4, "layout": "custom", "custom_blocks": [[0, 0], [1, 0], [2, 2], [3, 3]]}),
     ("custom_layout_sha1",)),
    (("local", {"window": 3}), ("local", {"window": 4}), ("window=3", "window=4")),
    (("additive", {"num_heads": H, "head_dim": E}), ("dot_product", {}),
     ("additive needs", "made by dot_product")),
    (("dot_product", {}), ("additive", {"num_heads": H, "head_dim": E}), ("made by additive",)),
]


@pytest.mark.parametrize("mine,theirs,words", FOREIGN, ids=lambda x: str(x)[:60])
def test_decode_refuses_a_state_of_another_config(mine, theirs, words) -> None:
    attn = attnreg.build(mine[0], **mine[1])
    state = _state(theirs[0], **theirs[1])
    with pytest.raises(ValueError, match="needs the state of its own init_state") as err:
        attn.decode(*_step(2), state)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("name,cfg,other", [
    ("performer", {"num_features": 8, "seed": 3}, {"eps": 1e-3, "chunk_size": 7}),
    ("local", {"window": 3}, {"block_size": 5}),
    ("bigbird", {"block_size": 4}, {"num_heads": H}),
    ("dot_product", {}, {"scale": 0.25}),
])
def test_decode_accepts_a_state_of_the_same_config(name: str, cfg: dict, other: dict) -> None:
    """Fields that do not change what the state holds (speed knobs, the softmax scale of a plain
    KV cache) may differ; index_select and to keep the record."""
    state = _state(name, **cfg).index_select(torch.tensor([1, 0])).to("cpu")
    out, state = attnreg.build(name, **cfg, **other).decode(*_step(2), state)
    assert out.shape == (B, H, 1, E) and state.length == 2 and state.variant == name


_BUILT_INS = [("dot_product", {}), ("additive", {"num_heads": H, "head_dim": E}), ("local", {"window": 3}),
              ("linear", {}), ("performer", {"num_features": 8}), ("sparse", {"block_size": 4}),
              ("bigbird", {"block_size": 2, "num_global_blocks": 1, "num_random_blocks": 1})]
_CONSTANT = ("local", "linear", "performer")  # O(window) / O(1) states


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,cfg", _BUILT_INS, ids=[n for n, _ in _BUILT_INS])
def test_generation_without_grad_keeps_no_graph(name: str, cfg: dict, mode: str) -> None:
    """Inputs and parameters requiring grad, generation under no_grad / inference_mode: the
    state holds no autograd graph, and a rolling or recurrent state does not grow."""
    attn = attnreg.build(name, **cfg).double()
    length = 40
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, length, E, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    sizes = []
    with ctx:
        state = attn.init_state(B, H, E, dtype=F64, max_length=length)
        _, state = attn.decode(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
        for t in range(5, length):
            _, state = attn.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            assert all(x.grad_fn is None and not x.requires_grad for x in state.tensors().values()), t
            sizes.append(state.nbytes)
    if name in _CONSTANT:
        assert len(set(sizes)) == 1, sizes


@pytest.mark.parametrize("name,cfg", [c for c in _BUILT_INS if c[0] in _CONSTANT], ids=list(_CONSTANT))
def test_grad_mode_without_trainable_inputs_keeps_no_graph(name: str, cfg: dict) -> None:
    """Grad mode on but nothing requires grad: no graph either (the common eval loop without
    no_grad), so memory stays O(window) / O(1) there too."""
    attn = attnreg.build(name, **cfg).double()
    state = attn.init_state(B, H, E, dtype=F64)
    sizes = []
    for t in range(20):
        _, state = attn.decode(*_step(t), state)
        assert all(x.grad_fn is None for x in state.tensors().values())
        sizes.append(state.nbytes)
    assert len(set(sizes[5:])) == 1, sizes
