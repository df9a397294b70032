"""Readable errors for users: unknown names with suggestions, pydantic errors without internals."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from attnreg.core import ConfigError, UnknownVariantError


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word`` (difflib), or None."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; safe for any value a config may hold (an int
    with more digits than Python will print, an object whose ``repr`` raises)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<{'negative ' if value < 0 else ''}int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - third-party objects: any repr failure becomes a placeholder
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_variant(name: object, known: list[str], records: Iterable[Any] = ()) -> UnknownVariantError:
    """The error for a variant name nobody registered, listing names and the closest match.

    ``records`` are the plugin records (``PluginRecord``): a plugin that failed to load, or was
    not loaded, whose entry point or distribution has this name is named with its error
    instead of a guess at another variant; other failed plugins are listed after the names.
    """
    from ._isolation import normalize_name

    missing = [r for r in records if r.status in ("failed", "filtered")]
    if isinstance(name, str):
        wanted = normalize_name(name)
        mine = [r for r in missing
                if wanted in (normalize_name(r.name), normalize_name(r.provider.rsplit(" ", 1)[0]))]
        if mine:
            r = mine[0]
            what = "failed to load" if r.status == "failed" else "is installed but was not loaded"
            return UnknownVariantError(
                f"attention variant {short_repr(name)} is not available: plugin '{r.name}' from "
                f"{r.provider} ({r.target}) {what}: {r.error}. Fix or reinstall that distribution "
                "(`attnreg doctor` shows every plugin and its error)."
            )
    guess = closest(short_repr(name), known) if isinstance(name, str) else None
    hint = f" Did you mean '{guess}'?" if guess else ""
    failed = [r for r in missing if r.status == "failed"]
    broken = ("" if not failed else " Plugins that failed to load (one may provide it): " + "; ".join(
        f"'{r.name}' from {r.provider}: {r.error}" for r in failed) + ".")
    return UnknownVariantError(
        f"unknown attention variant {short_repr(name)}.{hint} Registered names and aliases: "
        f"{', '.join(known) or '(none)'}.{broken} Run `attnreg doctor` if a plugin is missing."
    )


_BOUND_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _type_hint(value: object, error_type: str) -> str:
    """Why a value of the wrong type is refused, for the inputs people actually write."""
    if not error_type.endswith("_type"):
        return ""
    if isinstance(value, bool):
        return " (true/false is not a number; YAML also reads yes/no/on/off as true/false)"
    if isinstance(value, str) and error_type in ("int_type", "float_type"):
        return " (write the number without quotes)"
    if isinstance(value, float) and error_type == "int_type":
        return " (write a whole number without a decimal point)"
    return ""


def config_error(variant: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    """Translate a pydantic ``ValidationError`` into one ``ConfigError`` message per problem."""
    allowed = [f for f in model.model_fields]
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            guess = closest(field, allowed)
            hint = f"; did you mean '{guess}'?" if guess else ""
            lines.append(
                f"unknown field '{field}'{hint} (allowed fields: {', '.join(allowed)})"
            )
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if not field:  # a check across fields: its message names them
            lines.append(msg)
            continue
        ctx = e.get("ctx") or {}
        bounds = [f"{_BOUND_WORDS[k]} {short_repr(v)}" for k, v in ctx.items() if k in _BOUND_WORDS]
        bound = f" (bound: {field} {' and '.join(bounds)})" if bounds else ""
        if e["type"] == "missing":
            lines.append(f"field '{field}' is required")
        else:
            value = e.get("input")
            why = _type_hint(value, e["type"])
            lines.append(f"field '{field}' = {short_repr(value)} is invalid: {msg}{bound}{why}")
    body = "\n  ".join(lines)
    return ConfigError(f"invalid config for attention variant '{variant}':\n  {body}")


class PluginWarning(UserWarning):
    """A plugin misbehaved while loading (e.g. changed torch's global state, which attnreg put
    back), or ``ATTNREG_PLUGINS`` names no installed plugin. Strict mode makes these errors."""
