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
