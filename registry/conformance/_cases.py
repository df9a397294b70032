"""Cases (variant x check x dtype), expected failures, and running one case."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import attnreg
from attnreg.core import VariantSpec
from attnreg.core.dtypes import dtype_name, parse_dtype

# Importing the check modules registers their checks.
from . import (  # noqa: F401
    _checks_benchmark,
    _checks_contract,
    _checks_decoding,
    _checks_decoding_errors,
    _checks_distributed,
    _checks_grouped,
    _checks_masking,
    _checks_nonfinite,
    _checks_numeric,
    _checks_second_order,
)
from ._checks_contract import split_check_key
from ._framework import CHECKS, CONFIG_GROUPS, Subject, config_label
from ._outcomes import CheckFailure, NotApplicable

__all__ = ["Case", "build_cases", "parse_xfail", "pytest_params", "run_case", "run_check", "select_specs"]


@dataclass(frozen=True)
class Case:
    """One conformance test: a check applied to a variant at a dtype."""

    variant: str
    check: str
    group: str
    dtype: str  # "float64", ...; "-" for a not-applicable check with no dtype
    na: str | None = None  # why the check does not apply (reported as n.a.)
    xfail: str | None = None  # reason of a declared expected failure (strict)
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()  # one of the spec's check_configs; () = default config

    @property
    def subject(self) -> str:
        """``"local"``, or ``"local[window=2,block_size=4]"`` under check_configs overrides."""
        return config_label(self.variant, self.overrides)

    @property
    def id(self) -> str:
        """``"check[variant-dtype]"`` / ``"check[local[window=2,block_size=4]-dtype]"``: the item name."""
        return f"{self.check}[{self.subject}-{self.dtype}]"


def parse_xfail(items: Iterable[str]) -> dict[tuple[str | None, str], str]:
    """``["CHECK=REASON", "VARIANT:CHECK[dtype]=REASON"]`` -> {(variant|None, check key): reason}.

    A missing or empty reason, or an unknown check, is a ``ValueError``.
    """
    out: dict[tuple[str | None, str], str] = {}
    for raw in items:
        target, sep, reason = raw.partition("=")
        if not sep or not reason.strip():
            raise ValueError(f"expected failure {raw!r} needs a reason: CHECK=REASON or VARIANT:CHECK=REASON")
        variant, _, key = target.strip().rpartition(":")
        name, _ = split_check_key(key)
        if name not in CHECKS:
            raise ValueError(f"expected failure {raw!r}: unknown check {name!r}; known: {', '.join(CHECKS)}")
        out[(variant or None, key)] = reason.strip()
    return out


def select_specs(names: Sequence[str] | None = None) -> list[VariantSpec]:
    """Specs of ``names`` (names or aliases; None, [] or ["all"] = every registered variant)."""
    if not names or list(names) == ["all"]:
        return [attnreg.get_variant(n) for n in attnreg.list_variants()]
    specs: dict[str, VariantSpec] = {}
    for n in names:
        spec = attnreg.get_variant(n)
        specs.setdefault(spec.name, spec)
    return list(specs.values())


def _xfail_reason(spec: VariantSpec, check: str, dtype: str,
                  extra: Mapping[tuple[str | None, str], str], subject: str | None = None) -> str | None:
    names = [spec.name] if subject is None else [subject, spec.name]
    for key in (f"{check}[{dtype}]", check):
        # A check_configs subject also honours its own ``local[window=2,block_size=4]:CHECK`` entry.
        sources = [extra.get((n, key)) for n in names] + [extra.get((None, key))]
        if subject is not None:
            sources.insert(0, spec.expected_failures.get(f"{subject}:{key}"))
        for source in (*sources, spec.expected_failures.get(key)):
            if source:
                return source
    return None


def build_cases(names: Sequence[str] | None = None, *, dtypes: Sequence[str] | None = None,
                xfails: Iterable[str] = (), device: str = "cpu") -> list[Case]:
    """Every (variant, check, dtype) case of the selected variants, in a stable order.

    ``dtypes`` keeps only the cases at those dtypes; ``xfails`` adds expected failures
    (``parse_xfail`` syntax) on top of each spec's ``expected_failures``.
    """
    extra = parse_xfail(xfails)
    keep = None if not dtypes else {dtype_name(parse_dtype(d)) for d in dtypes}
    cases = []
    for spec in select_specs(names):
        caps = spec.capabilities
        configs: list[tuple[tuple[str, Any], ...]] = [()]
        configs += [tuple(c.items()) for c in spec.check_configs]
        for overrides in configs:
            subject = config_label(spec.name, overrides) if overrides else None
            for chk in CHECKS.values():
                if overrides and chk.group not in CONFIG_GROUPS:
                    continue
                na = chk.not_applicable(caps)
                dts = [dtype_name(d) for d in chk.dtypes_for(caps)]
                if keep is not None:
                    dts = [d for d in dts if d in keep]
                    if not dts:
                        continue
                if not dts:
                    cases.append(Case(spec.name, chk.name, chk.group, "-", na or "no dtype below the "
                                      "reference dtype is declared", device=device, overrides=overrides))
                    continue
                for d in dts:
                    xfail = None if na else _xfail_reason(spec, chk.name, d, extra, subject)
                    cases.append(Case(spec.name, chk.name, chk.group, d, na, xfail, device, overrides))
    return cases


def run_check(variant: str | VariantSpec, check: str, dtype: str | torch.dtype = "float64",
              device: str = "cpu", overrides: Mapping[str, Any] | None = None) -> None:
    """Run one check; raises ``CheckFailure`` (with sizes and max error) or ``NotApplicable``.

    ``overrides`` (e.g. one of the spec's ``check_configs``) are config fields every module the
    check builds gets. The global RNG state is restored afterwards.
    """
    spec = variant if isinstance(variant, VariantSpec) else attnreg.get_variant(variant)
    chk = CHECKS[check]
    na = chk.not_applicable(spec.capabilities)
    if na:
        raise NotApplicable(na)
    dt = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
    subject = Subject(spec, dt, torch.device(device), dict(overrides or {}))
    with torch.random.fork_rng(devices=[]):
        try:
            chk.fn(subject)
        except (CheckFailure, NotApplicable):
            raise
        except Exception as err:
            # A crash inside the variant: name the inputs it was given (kept in the traceback).
            if subject.last_sizes and hasattr(err, "add_note"):
                err.add_note(f"inputs: {subject.last_sizes}")
            raise


def run_case(case: Case) -> None:
    """Run a case under pytest: not-applicable -> ``pytest.skip``, failures raise."""
    import pytest

    if case.na:
        pytest.skip(f"n.a.: {case.na}")
    try:
        run_check(case.variant, case.check, case.dtype, case.device, dict(case.overrides))
    except NotApplicable as na:
        pytest.skip(f"n.a.: {na}")


def pytest_params(names: Sequence[str] | None = None, *, include_na: bool = False, **kw: Any) -> list[Any]:
    """``pytest.param`` list for ``@pytest.mark.parametrize("case", ...)`` over ``build_cases``;
    expected failures become strict xfails with their reason."""
    import pytest

    out = []
    for case in build_cases(names, **kw):
        if case.na and not include_na:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case, id=f"{case.subject}-{case.check}-{case.dtype}", marks=marks))
    return out
