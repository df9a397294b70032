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
    (("sparse", {"block_size": 4, "layout": "custom", "custom_layout": [[0, 0], [1, 1], [2, 2], [3, 3]]}),
     ("sparse", {"block_size": 4, "layout": "custom", "custom_layout": [[0, 0], [1, 0], [2, 2], [3, 3]]}),
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
