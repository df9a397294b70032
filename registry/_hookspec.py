"""The hook attnreg calls on every plugin: ``attnreg_variants``. Plugins never import this; they
mark their function with ``attnreg.core.hookimpl`` (whose project name this module shares)."""

from __future__ import annotations

import pluggy

from attnreg.core import VariantSpec, hookimpl

__all__ = ["PROJECT_NAME", "AttnregHookSpecs"]

PROJECT_NAME = hookimpl.project_name
hookspec = pluggy.HookspecMarker(PROJECT_NAME)


class AttnregHookSpecs:
    """Hook specifications of attnreg (the plugin author's manual: docs/plugins.md)."""

    @hookspec
    def attnreg_variants(self) -> list[VariantSpec]:  # type: ignore[empty-body]
        """Return the attention variants this plugin provides.

        How to publish a variant:

        1. Subclass ``attnreg.core.AttentionConfig`` with ``variant: Literal["my_attn"]`` (the
           one place the name is written) and typed, bounded, documented fields.
        2. Subclass ``attnreg.core.Attention``; set ``config_class = MyConfig`` (``variant`` is
           derived from it) and ``capabilities = Capabilities(...)``; implement ``_attend(q, k,
           v, masks)`` and ``_weights(q, k, masks)``. Inputs arrive validated; ``masks``
           (``attnreg.core.Masks``) holds the canonical masks.
        3. In a module of your package::

               from attnreg.core import hookimpl, VariantSpec

               @hookimpl
               def attnreg_variants():
                   return [VariantSpec.of(MyAttention, summary="...", reference="Author et al. 2025")]

        4. Declare the module in your ``pyproject.toml``::

               [project.entry-points.attnreg]
               my_attn = "my_package.plugin"

        5. Run ``attnreg check my_attn``: the conformance suite verifies every declared
           capability both ways (declared True must work, declared False must raise
           ``UnsupportedFeatureError``).

        Optional ``VariantSpec.of`` arguments: ``aliases``; ``expected_failures={"check":
        "reason"}`` (strict xfail); ``check_configs=({"block_size": 4}, ...)``: config overrides
        the suite also runs its numeric checks under, each reported as the subject
        ``my_attn[block_size=4]``. The suite's inputs are tiny (L <= 263), so declare small
        blocks / chunks / windows here when your fast path only starts at longer lengths;
        otherwise only the dense fallback is ever checked. Each entry must validate with your
        config (``ValueError`` naming the variant when the spec is built).

        Names and aliases are global: a name already taken makes the whole plugin fail to load
        (shown by ``attnreg doctor``). The hook takes no arguments and must return a list (or
        tuple) of ``VariantSpec``; anything else is a plugin load error.
        """
