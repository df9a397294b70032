"""The ``hookimpl`` marker a plugin decorates its ``attnreg_variants`` function with. The hook's
specification belongs to the host that calls it (``attnreg``'s plugin manager)."""

from __future__ import annotations

import pluggy

__all__ = ["hookimpl"]

hookimpl = pluggy.HookimplMarker("attnreg")
