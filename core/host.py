"""Host decisions on tensor values that must also work on the ``meta`` device.

A fast path often branches on a property of the data ("is every value finite?", "is some row
empty?"). On ``meta`` tensors there are no values (``.item()`` raises), yet shape inference on
meta is how large models are built without memory. ``known`` answers such a question with a
caller-chosen answer on meta: the one that takes the GENERAL path, whose shapes are the same.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["known"]


def known(flag: Tensor, on_meta: bool) -> bool:
    """``bool(flag)`` for a one-element bool tensor; ``on_meta`` where ``flag`` lives on the meta
    device. Pick for ``on_meta`` the answer whose branch handles every input (e.g. ``True`` for
    "some row may need the slow repair" when the repair branch is the general one)."""
    if flag.device.type == "meta":
        return on_meta
    return bool(flag)
