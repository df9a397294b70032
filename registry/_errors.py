"""Readable errors for users: unknown names with suggestions, pydantic errors without internals."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from attnreg.core import ConfigError, UnknownVariantError


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word`` (difflib), or None."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_variant(name: object, known: list[str]) -> UnknownVariantError:
    """The error for a variant name nobody registered, listing names and the closest match."""
    guess = closest(str(name), known)
    hint = f" Did you mean '{guess}'?" if guess else ""
    return UnknownVariantError(
        f"unknown attention variant {name!r}.{hint} Registered names and aliases: "
        f"{', '.join(known) or '(none)'}. Run `attnreg doctor` if a plugin is missing."
    )


_BOUND_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def config_error(variant: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    """Translate a pydantic ``ValidationError`` into one ``ConfigError`` message per problem."""
    allowed = [f for f in model.model_fields]
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            guess = closest(field, allowed)
            hint = f"; did you mean '{guess}'?" if guess else ""
            lines.append(
                f"unknown field '{field}'{hint} (allowed fields: {', '.join(allowed)})"
            )
            continue
        ctx = e.get("ctx") or {}
        bounds = [f"{_BOUND_WORDS[k]} {v}" for k, v in ctx.items() if k in _BOUND_WORDS]
        bound = f" (bound: {field} {' and '.join(bounds)})" if bounds else ""
        if e["type"] == "missing":
            lines.append(f"field '{field}' is required")
        else:
            lines.append(f"field '{field}' = {e.get('input')!r} is invalid: {e['msg']}{bound}")
    body = "\n  ".join(lines)
    return ConfigError(f"invalid config for attention variant '{variant}':\n  {body}")


class PluginWarning(UserWarning):
    """A plugin misbehaved while loading (e.g. changed torch's global state, which attnreg put
    back), or ``ATTNREG_PLUGINS`` names no installed plugin. Strict mode makes these errors."""
