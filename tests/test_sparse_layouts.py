"""sparse / bigbird: layout properties, determinism, and config validation."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import attnreg
from attnreg.plugins.sparse import SparseAttention, SparseConfig
from attnreg.plugins.sparse.layouts import default_stride, expand_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def bigbird(**fields) -> SparseAttention:
    return attnreg.build("bigbird", **fields)


@pytest.mark.parametrize("window,num_global,num_random", [(3, 2, 3), (5, 1, 2), (1, 0, 4), (3, 3, 0)])
def test_bigbird_window_global_and_random_counts(window, num_global, num_random):
    nb, heads = 40, 4
    attn = bigbird(block_size=8, num_window_blocks=window, num_global_blocks=num_global,
                   num_random_blocks=num_random)
    layout = attn.layout(nb * 8, heads)  # (H, nb, nb)
    assert layout.shape == (heads, nb, nb)
    idx = torch.arange(nb)
    band = (idx[None, :] - idx[:, None]).abs() <= window // 2  # (nb, nb)
    assert layout[:, band].all(), "window band missing"
    assert layout[:, :num_global, :].all() and layout[:, :, :num_global].all(), "global rows/cols"
    base = band.clone()
    base[:num_global], base[:, :num_global] = True, True
    extra = layout & ~base  # (H, nb, nb) the random blocks
    rows = slice(num_global, None)
    available = (~base).sum(-1)[rows]  # (nb - g,) candidates per non-global row
    want = torch.minimum(available, torch.tensor(num_random))
    for h in range(heads):
        assert torch.equal(extra[h, rows].sum(-1), want), "random blocks per row"


def test_bigbird_random_blocks_differ_per_head_and_seed_but_not_per_call():
    attn = bigbird(block_size=16)
    layout = attn.layout(4096, 8)  # nb = 256
    assert len({tuple(layout[h].flatten().tolist()) for h in range(8)}) == 8, "heads must differ"
    again = bigbird(block_size=16).layout(4096, 8)
    assert torch.equal(layout, again)
    assert torch.equal(bigbird(block_size=16).layout(4096, 3), layout[:3]), "head h independent of H"
    assert not torch.equal(bigbird(block_size=16, seed=1).layout(4096, 8), layout)


def test_bigbird_layout_ignores_global_rng():
    torch.manual_seed(0)
    a = bigbird(block_size=16).layout(2048, 2)
    torch.manual_seed(123)
    torch.rand(10)
    b = bigbird(block_size=16).layout(2048, 2)
    assert torch.equal(a, b)


def test_bigbird_layout_same_in_a_fresh_process():
    code = (
        "import attnreg, json, torch; torch.manual_seed(7);"
        "m = attnreg.build('bigbird', block_size=16, seed=5);"
        "print(json.dumps(m.layout(3000, 4).int().tolist()))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(res.stdout), dtype=torch.bool)
    assert torch.equal(theirs, bigbird(block_size=16, seed=5).layout(3000, 4))


def test_causal_bigbird_is_the_causal_part_of_the_layout():
    attn = bigbird(block_size=4)
    pattern = attn.pattern_mask(60, 2)
    q = torch.randn(1, 2, 60, 8)
    w = attn.attention_weights(q, q, is_causal=True)  # (1, 2, 60, 60)
    assert torch.equal(w[0] > 0, pattern & torch.ones(60, 60, dtype=torch.bool).tril())


def _paper_strided(nb: int, stride: int) -> torch.Tensor:
    return torch.tensor(
        [[abs(i - j) < stride or (i - j) % stride == 0 for j in range(nb)] for i in range(nb)]
    )


def _paper_fixed(nb: int, stride: int, c: int) -> torch.Tensor:
    return torch.tensor(
        [[i // stride == j // stride or j % stride >= stride - c for j in range(nb)] for i in range(nb)]
    )


@pytest.mark.parametrize("nb,stride", [(1, None), (10, 3), (17, None), (16, 4)])
def test_strided_layout_matches_child_et_al(nb, stride):
    attn = attnreg.build("sparse", layout="strided", block_size=4, stride=stride)
    want = _paper_strided(nb, stride or default_stride(nb))
    assert torch.equal(attn.layout(nb * 4 - 1, 2)[1], want)


@pytest.mark.parametrize("nb,stride,c", [(1, None, 1), (12, 4, 1), (12, 4, 2), (20, None, 1), (9, 3, 3)])
def test_fixed_layout_matches_child_et_al(nb, stride, c):
    attn = attnreg.build("sparse", layout="fixed", block_size=4, stride=stride, c=c)
    want = _paper_fixed(nb, stride or max(default_stride(nb), c), c)
    assert torch.equal(attn.layout(nb * 4, 2)[0], want)


def test_default_stride_is_ceil_sqrt():
    assert [default_stride(n) for n in (1, 2, 4, 5, 16, 17, 256)] == [1, 2, 2, 3, 4, 5, 16]


def test_pattern_mask_is_the_expanded_layout_with_partial_last_block():
    attn = attnreg.build("sparse", layout="strided", block_size=4, stride=2)
    pattern = attn.pattern_mask(10)  # 3 blocks, the last one 2 tokens
    layout = attn.layout(10, 1)[0]
    assert pattern.shape == (1, 10, 10)
    for i in range(10):
        for j in range(10):
            assert bool(pattern[0, i, j]) == bool(layout[i // 4, j // 4])
    assert torch.equal(expand_layout(attn.layout(12, 1), 4, 12)[:, :10, :10], pattern)


# ------------------------------------------------------------------ custom layouts
def test_custom_blocks_matrix_and_tensor_agree():
    pairs = [[0, 0], [1, 0], [1, 1], [2, 2], [2, 0]]
    matrix = [[True, False, False], [True, True, False], [True, False, True]]
    a = attnreg.build("sparse", layout="custom", custom_blocks=pairs, block_size=4)
    b = attnreg.build("sparse", layout="custom", custom_matrix=matrix, block_size=4)
    b01 = attnreg.build("sparse", layout="custom", custom_matrix=[[int(x) for x in r] for r in matrix],
                        block_size=4)
    c = SparseAttention.from_layout(torch.tensor(matrix), block_size=4)
    for m in (a, b, b01, c):
        assert torch.equal(m.layout(12, 2)[1], torch.tensor(matrix))
    assert b01.config == b.config  # 0/1 is stored as true/false
    assert attnreg.build(a.config.model_dump()).config == a.config  # round trips
    assert attnreg.validate_config(json.loads(c.config.model_dump_json())) == c.config
    # the decoding fingerprint names the layout, whichever form wrote it
    digests = {m._state_fingerprint()["custom_layout_sha1"] for m in (a, b, b01, c)}
    assert len(digests) == 1


def test_a_2x2_01_matrix_and_two_pairs_are_different_layouts():
    """The input that used to be ambiguous: each field reads it its own way."""
    value = [[0, 1], [1, 1]]
    blocks = attnreg.build("sparse", layout="custom", custom_blocks=value, block_size=2)
    matrix = attnreg.build("sparse", layout="custom", custom_matrix=value, block_size=2)
    assert blocks.layout(4, 1)[0].tolist() == [[False, True], [False, True]]  # pairs (0,1), (1,1)
    assert matrix.layout(4, 1)[0].tolist() == [[False, True], [True, True]]  # rows of a matrix
    assert (blocks._state_fingerprint()["custom_layout_sha1"]
            != matrix._state_fingerprint()["custom_layout_sha1"])


@pytest.mark.parametrize(
    "value,match",
    [
        ([[0, 1], [1, 0]], r"reads both ways: as \[query_block, key_block\] pairs write custom_blocks: "
                           r"\[\[0, 1\], \[1, 0\]\]; as a matrix write custom_matrix: "
                           r"\[\[0, 1\], \[1, 0\]\]"),
        ([[1, 0, 1], [0, 1, 1], [1, 1, 1]], r"is a matrix: write custom_matrix: \[\[1, 0, 1\]"),
        ([[True, False], [True, True]], r"is a matrix: write custom_matrix: \[\[True, False\]"),
        ([[0, 0], [1, 0], [1, 1]], r"is a list of pairs: write custom_blocks: \[\[0, 0\], \[1, 0\]"),
        ([[0, 5], [1, 0]], r"is a list of pairs: write custom_blocks"),
        ("x", "write one of them instead of custom_layout"),
    ],
)
def test_former_custom_layout_field_says_what_to_write(value, match):
    with pytest.raises(attnreg.ConfigError, match="custom_layout was replaced by two fields") as info:
        attnreg.build("sparse", layout="custom", custom_layout=value)
    assert re.search(match, str(info.value), flags=re.I), str(info.value)


def test_custom_per_head_layout():
    layout = torch.stack([torch.eye(3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool)])
    attn = SparseAttention.from_layout(layout, block_size=2)
    assert torch.equal(attn.pattern_mask(6), expand_layout(layout, 2, 6))
    with pytest.raises(ValueError, match="2 heads but the input has 3"):
        attn(torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 4))
    with pytest.raises(ValueError, match="custom_matrix has 2 heads but num_heads=3"):
        SparseAttention.from_layout(layout, block_size=2, num_heads=3)  # a config model: pydantic's error
    with pytest.raises(attnreg.ConfigError, match="custom_matrix has 2 heads but num_heads=3"):
        attnreg.build("sparse", layout="custom", custom_matrix=layout, num_heads=3)


@pytest.mark.parametrize(
    "field,layout,match",
    [
        ("custom_blocks", [[0, 0], [1, 2]], "key_block out of range"),
        ("custom_blocks", [[0, 0], [2, 2], [2, 1]], r"query block\(s\) \[1\] attend to nothing"),
        ("custom_blocks", [[0, -1]], "non-negative"),
        ("custom_blocks", [[True, False]], "integer pairs"),
        ("custom_blocks", [[0, 0, 0]], "integer pairs"),
        ("custom_blocks", [[0.0, 0]], "integer pairs"),
        ("custom_blocks", [[10**9, 0]], "at most 4096"),
        ("custom_blocks", [], "non-empty"),
        ("custom_blocks", "0,0", "non-empty"),
        ("custom_matrix", [[True, False], [False, False]], r"row\(s\) \[\[1\]\]"),
        ("custom_matrix", [[True, False], [True]], "ragged"),
        ("custom_matrix", [[True, False, True], [True, True, True]], "square"),
        ("custom_matrix", [[1, 2], [1, 1]], "true/false or 0/1"),
        ("custom_matrix", [[1.0, 0.0], [1.0, 1.0]], "true/false or 0/1"),
        ("custom_matrix", [True, False], "nesting depth 1"),
        ("custom_matrix", [[[[True]]]], "nesting depth 4"),
        ("custom_matrix", [], "non-empty"),
    ],
)
def test_custom_layout_validation_errors(field, layout, match):
    with pytest.raises(attnreg.ConfigError, match=match) as info:
        attnreg.build("sparse", layout="custom", **{field: layout})
    assert f"'{field}'" in str(info.value)


def test_custom_tensor_must_be_bool_and_length_must_fit():
    with pytest.raises(ValueError, match="must be bool"):
        SparseAttention.from_layout(torch.ones(2, 2))
    attn = SparseAttention.from_layout(torch.ones(2, 2, dtype=torch.bool), block_size=4)
    q = torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match="fits lengths 5..8; got length 9"):
        attn(q, q, q)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"layout": "custom"}, "needs custom_blocks"),
        ({"layout": "bigbird", "custom_blocks": [[0, 0]]}, "custom_blocks is given but layout='bigbird'"),
        ({"layout": "fixed", "custom_matrix": [[True]]}, "custom_matrix is given but layout='fixed'"),
        ({"layout": "custom", "custom_blocks": [[0, 0]], "custom_matrix": [[True]]}, "give one of them"),
        ({"num_window_blocks": 4}, "must be odd"),
        ({"layout": "fixed", "stride": 2, "c": 3}, r"c=3 must be <= stride=2"),
        ({"block_size": 0}, "block_size"),
        ({"layot": "bigbird"}, "layout"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(attnreg.ConfigError, match=match):
        attnreg.build("sparse", **fields)


def test_config_defaults_are_documented():
    for name, field in SparseConfig.model_fields.items():
        assert field.description, name


def test_custom_layout_from_yaml_file(tmp_path):
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text("variant: block_sparse\nlayout: custom\nblock_size: 4\n"
                     "custom_blocks: [[0, 0], [1, 0], [1, 1]]\n")
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("variant: sparse\nlayout: custom\nblock_size: 4\n"
                      "custom_matrix:\n  - [true, false]\n  - [true, true]\n")
    matrix01 = tmp_path / "matrix01.json"
    matrix01.write_text('{"variant": "sparse", "layout": "custom", "block_size": 4, '
                        '"custom_matrix": [[1, 0], [1, 1]]}')
    want = torch.tensor([[True, False], [True, True]])
    for path in (pairs, matrix, matrix01):
        attn = attnreg.build(attnreg.load_config(path))
        assert torch.equal(attn.layout(8, 1)[0], want)


def test_custom_layout_examples_in_the_docs_build_the_same_layout():
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "variants" / "sparse.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "custom_" in b]
    assert len(blocks) == 2
    layouts = [attnreg.build(yaml.safe_load(b)["attention"]).layout(3 * 64, 1) for b in blocks]
    assert torch.equal(layouts[0], layouts[1])
