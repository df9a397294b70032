"""Throwaway plugin distributions on sys.path (a real .dist-info with entry_points.txt), so that
plugin loading is tested through importlib.metadata exactly as for an installed package."""

from __future__ import annotations

import textwrap
from pathlib import Path

GOOD_PLUGIN = '''
from typing import Literal
from pydantic import Field
from attnreg.core import VariantSpec, hookimpl
from attnreg.plugins.dot_product import DotProductAttention, DotProductConfig

class Cfg(DotProductConfig.__base__):
    variant: Literal["{name}"] = Field("{name}", description="name")

class Attn(DotProductAttention):
    variant = "{name}"

@hookimpl
def attnreg_variants():
    return [VariantSpec(name="{name}", config=Cfg, factory=Attn, capabilities=Attn.capabilities,
                        summary="test variant", reference="none", aliases={aliases!r})]
'''

BROKEN_PLUGINS = {
    "import_error": "raise ImportError('boom at import')\n",
    "hook_raises": (
        "from attnreg.core import hookimpl\n"
        "@hookimpl\n"
        "def attnreg_variants():\n"
        "    raise RuntimeError('boom in hook')\n"
    ),
    "bad_return": (
        "from attnreg.core import hookimpl\n"
        "@hookimpl\n"
        "def attnreg_variants():\n"
        "    return ['not a spec']\n"
    ),
    "name_clash": GOOD_PLUGIN.format(name="dot_product", aliases=()),
    "alias_clash": GOOD_PLUGIN.format(name="clash_variant", aliases=("sdpa",)),
}


def make_dist(root: Path, dist: str, entry: str, module: str, code: str) -> None:
    """Write module ``module`` and a ``dist`` .dist-info declaring ``entry = module`` under attnreg."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"  # the stem before "-" is the name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[attnreg]\n{entry} = {module}\n")
