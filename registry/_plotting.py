"""matplotlib for the picture writers (``attnreg.pictures``, the bench's plots), from the ``plot`` extra."""

from __future__ import annotations

from typing import Any

from attnreg.core import ConfigError

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no display); ``ConfigError`` naming the
    ``plot`` extra when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'attnreg[plot]'") from None
    return plt
