"""The code in the plugin author's guide runs and the variant it defines works."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

import attnreg

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_guide_example_registers_and_builds() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    mod = types.ModuleType("my_package_plugin")
    exec(compile(code, "docs/plugins.md", "exec", dont_inherit=True), mod.__dict__)
    attnreg.register(mod)
    try:
        attn = attnreg.build("my_attn", temperature=2.0)
        q = torch.randn(1, 2, 5, 4, dtype=torch.float64)  # (B, H, L, E)
        out = attn(q, q, q, is_causal=True)
        expected = attnreg.build("sdpa", scale=0.5 / 2.0)(q, q, q, is_causal=True)
        assert torch.allclose(out, expected, atol=1e-12)
    finally:
        attnreg.unregister("my_attn")


def test_readme_model_layer_snippet_generates_like_recomputation(capsys) -> None:
    """The README's MultiHeadAttention snippet runs; its stateful generation equals recomputing
    the causal forward over the whole sequence at every step."""
    text = (ROOT / "README.md").read_text()
    blocks = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if "MultiHeadAttention" in c and ".decode(" in c]
    assert len(blocks) == 1
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec", dont_inherit=True), ns)
    layer, embed, head, prompt, real = (ns[n] for n in ("layer", "embed", "head", "prompt", "real"))
    generated = torch.stack(ns["tokens"], 1)  # (B, 8)
    assert generated.shape == (2, 8) and ns["state"].length == 5 + 7  # the last token is not fed
    assert str(generated[0, 0].item()) in capsys.readouterr().out
    seq, mask = prompt, real
    with torch.no_grad():
        for t in range(8):  # no state: the whole sequence again for every token
            nxt = head(layer(embed(seq), key_mask=mask, is_causal=True)[:, -1]).argmax(-1)  # (B,)
            assert torch.equal(nxt, generated[:, t])
            seq = torch.cat([seq, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
