"""What a conformance check raises when it does not pass."""

from __future__ import annotations

__all__ = ["CheckFailure", "NotApplicable"]


class CheckFailure(AssertionError):
    """A conformance check found the variant violating the contract."""


class NotApplicable(Exception):
    """The check does not apply to this variant (e.g. the feature is declared False)."""
