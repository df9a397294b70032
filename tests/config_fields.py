"""What a variant's config declares, read from its pydantic model: field kinds and bounds.

Used by the config bound and property tests so that every registered variant (a new plugin
included) is probed without listing its fields by hand.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types as at

import attnreg


@dataclass(frozen=True)
class FieldKind:
    """One config field: ``kind`` is int, float, bool, str, literal or other (nested/complex)."""

    name: str
    kind: str
    optional: bool
    required: bool
    lo: float | None = None  # lower bound and whether it is strict (gt)
    lo_strict: bool = False
    hi: float | None = None
    hi_strict: bool = False
    choices: tuple[Any, ...] = ()

    def smallest(self) -> Any:
        """The smallest valid value of an int/float field (its lower bound, or one step above)."""
        if self.kind == "int":
            lo = 0 if self.lo is None else int(self.lo)
            return lo + 1 if self.lo_strict else lo
        lo = 0.0 if self.lo is None else float(self.lo)
        return math.nextafter(lo, math.inf) if self.lo_strict else lo

    def largest(self) -> Any:
        """The largest valid value of a bounded int/float field."""
        assert self.hi is not None, self.name
        if self.kind == "int":
            return int(self.hi) - 1 if self.hi_strict else int(self.hi)
        return math.nextafter(float(self.hi), -math.inf) if self.hi_strict else float(self.hi)


def _kind(annotation: Any) -> tuple[str, bool, tuple[Any, ...]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            kind, _, choices = _kind(args[0])
            return kind, optional, choices
        return "other", optional, ()
    if origin is Literal:
        return "literal", False, typing.get_args(annotation)
    for name, tp in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation is tp:
            return name, False, ()
    return "other", False, ()


def config_fields(variant: str) -> list[FieldKind]:
    """The fields of ``variant``'s config, ``variant`` itself left out."""
    model = attnreg.get_variant(variant).config
    out = []
    for name, info in model.model_fields.items():
        if name == "variant":
            continue
        kind, optional, choices = _kind(info.annotation)
        bounds: dict[str, Any] = {}
        for m in info.metadata:
            if isinstance(m, (at.Ge, at.Gt)):
                bounds.update(lo=m.ge if isinstance(m, at.Ge) else m.gt, lo_strict=isinstance(m, at.Gt))
            elif isinstance(m, (at.Le, at.Lt)):
                bounds.update(hi=m.le if isinstance(m, at.Le) else m.lt, hi_strict=isinstance(m, at.Lt))
        out.append(FieldKind(name, kind, optional, info.is_required(), choices=choices, **bounds))
    return out


def minimal_config(variant: str) -> dict[str, Any]:
    """``{"variant": ...}`` plus the smallest valid value of every required field."""
    fields: dict[str, Any] = {"variant": variant}
    for f in config_fields(variant):
        if f.required:
            fields[f.name] = f.smallest() if f.kind in ("int", "float") else f.choices[0]
    return fields
