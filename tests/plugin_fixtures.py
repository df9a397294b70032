"""Throwaway plugin distributions on sys.path (a real .dist-info with entry_points.txt), so that
plugin loading is tested through importlib.metadata exactly as for an installed package."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
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


def make_dist(root: Path, dist: str, entry: str, module: str, code: str | None,
              attr: str | None = None) -> None:
    """Write module ``module`` (none if ``code`` is None) and a ``dist`` .dist-info declaring
    ``entry = module[:attr]`` under attnreg."""
    if code is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"  # the stem before "-" is the name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    target = module if attr is None else f"{module}:{attr}"
    (info / "entry_points.txt").write_text(f"[attnreg]\n{entry} = {target}\n")


@dataclass(frozen=True)
class Hostile:
    """One plugin breakage: its module code and what the registry must record for it.

    ``status`` is the record's status; ``text`` must appear in its error (failed) or in its
    warnings (loaded: the plugin works but did something it must not, an error in strict mode).
    """

    code: str | None
    status: str
    text: str
    attr: str | None = None


_HOOK = "from attnreg.core import hookimpl\n@hookimpl\ndef attnreg_variants():\n"
# A plugin whose code starts a thread that uses attnreg and joins it: before attnreg guarded
# against it this deadlocked forever; the join timeout turns a regression into a failure.
_THREAD_USE = '''
import threading
import attnreg
OUTCOME = {}
def _use_attnreg():
    try:
        OUTCOME["result"] = attnreg.list_variants()
    except Exception as exc:
        OUTCOME["error"] = exc
def _start_and_join():
    t = threading.Thread(target=_use_attnreg, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():
        raise RuntimeError("deadlock: the thread using attnreg never returned")
'''


def _good(name: str, before: str = "", in_hook: str = "") -> str:
    """``GOOD_PLUGIN`` with ``before`` run at import and ``in_hook`` at the start of the hook."""
    code = GOOD_PLUGIN.format(name=name, aliases=())
    hook = "def attnreg_variants():\n"
    return before + code.replace(hook, hook + textwrap.indent(in_hook, "    "))


_TORCH = "import torch\n"
_BAD_SPEC = ("    from attnreg.core import VariantSpec\n"
             "    return [VariantSpec(name='Bad Name', config=None, factory=None, capabilities=None,"
             " summary='', reference='')]\n")
_BOOM = "class Boom(BaseException):\n    pass\n"

HOSTILE_PLUGINS: dict[str, Hostile] = {
    # ordinary breakages: isolated since the first release
    "import_error": Hostile(BROKEN_PLUGINS["import_error"], "failed", "ImportError: boom at import"),
    "hook_raises": Hostile(BROKEN_PLUGINS["hook_raises"], "failed", "RuntimeError: boom in hook"),
    "bad_return": Hostile(BROKEN_PLUGINS["bad_return"], "failed",
                          "every item must be an attnreg.VariantSpec"),
    "name_clash": Hostile(BROKEN_PLUGINS["name_clash"], "failed",
                          "'dot_product' from attnreg-hostile-name-clash"),
    "alias_clash": Hostile(BROKEN_PLUGINS["alias_clash"], "failed",
                           "'sdpa' from attnreg-hostile-alias-clash"),
    "syntax_error": Hostile("def broken(:\n", "failed", "SyntaxError"),
    "missing_module": Hostile(None, "failed", "ModuleNotFoundError"),
    "missing_attr": Hostile("X = 1\n", "failed", "AttributeError", attr="nowhere"),
    "no_hook": Hostile("X = 1\n", "failed", "defines no @attnreg.hookimpl function 'attnreg_variants'"),
    "returns_none": Hostile(_HOOK + "    return None\n", "failed", "got NoneType"),
    "returns_empty": Hostile(_HOOK + "    return []\n", "failed", "returned no variants"),
    "bad_spec": Hostile(_HOOK + _BAD_SPEC, "failed", "Bad Name"),
    # process exits and other BaseExceptions: recorded, never exit the process
    "exit_at_import": Hostile("import sys\nsys.exit(3)\n", "failed", "sys.exit(3)"),
    "exit_in_hook": Hostile(_HOOK + "    import sys\n    sys.exit('bye')\n", "failed", "sys.exit('bye')"),
    "base_exception": Hostile(_BOOM + _HOOK + "    raise Boom('custom')\n", "failed", "Boom: custom"),
    # threads using attnreg while the plugin loads: no deadlock, the thread gets an error
    "thread_at_import": Hostile(_good("hostile_thread_import", _THREAD_USE + "_start_and_join()\n"),
                                "loaded", "started a thread that used attnreg"),
    "thread_in_hook": Hostile(_good("hostile_thread_hook", _THREAD_USE, "_start_and_join()\n"),
                              "loaded", "started a thread that used attnreg"),
    # torch's global state changed while loading: put back and reported
    "num_threads": Hostile(_good("hostile_threads", _TORCH + "torch.set_num_threads(7)\n"),
                           "loaded", "num_threads"),
    "seed": Hostile(_good("hostile_seed", _TORCH + "torch.manual_seed(1234)\n"), "loaded", "RNG reseeded"),
    "rng_draw": Hostile(_good("hostile_rng", _TORCH + "NOISE = torch.randn(3)\n"), "loaded",
                        "RNG state advanced"),
    "default_dtype": Hostile(_good("hostile_dtype", _TORCH + "torch.set_default_dtype(torch.float64)\n"),
                             "loaded", "default_dtype torch.float32 -> torch.float64"),
    "grad_mode": Hostile(_good("hostile_grad", _TORCH, "torch.set_grad_enabled(False)\n"),
                         "loaded", "grad_enabled True -> False"),
}


def hostile_dist(entry: str) -> str:
    """The distribution name of hostile plugin ``entry``."""
    return f"attnreg-hostile-{entry.replace('_', '-')}"


def make_hostile_dists(root: Path) -> None:
    """One throwaway distribution per ``HOSTILE_PLUGINS`` entry."""
    for entry, h in HOSTILE_PLUGINS.items():
        make_dist(root, hostile_dist(entry), entry, f"attnreg_test_hostile_{entry}", h.code, h.attr)
