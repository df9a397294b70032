"""The ``pytest11`` plugin of attnreg: ``pytest --attnreg-variants=NAME[,NAME|all]``.

pytest loads this module in EVERY run of an environment where attnreg is installed, so it only
registers options. torch, the registry and the checks are imported only when
``--attnreg-variants`` (or the ``attnreg_variants`` ini key) is given; otherwise the run is
exactly what it would be without attnreg.
"""

from __future__ import annotations

from typing import Any


def pytest_addoption(parser: Any) -> None:
    """Register the suite's command-line options and ini key."""
    group = parser.getgroup("attnreg", "attnreg conformance suite")
    group.addoption("--attnreg-variants", default=None, metavar="NAMES",
                    help="run the attnreg conformance suite on these registered variants "
                    "(comma-separated names or aliases, or 'all').")
    group.addoption("--attnreg-dtypes", default=None, metavar="DTYPES",
                    help="only run the checks at these dtypes (comma-separated, e.g. float32,bfloat16).")
    group.addoption("--attnreg-xfail", action="append", default=[], metavar="[VARIANT:]CHECK=REASON",
                    help="mark a check as an expected failure (strict) with a reason; repeatable.")
    group.addoption("--attnreg-device", default="cpu", metavar="DEVICE",
                    help="device to run the conformance checks on (default cpu).")
    parser.addini("attnreg_variants", "variants the attnreg conformance suite runs on (like "
                  "--attnreg-variants)", default="")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def pytest_configure(config: Any) -> None:
    """Activate the suite only when variants were selected."""
    variants = _split(config.getoption("attnreg_variants")) or _split(config.getini("attnreg_variants"))
    if not variants:
        return
    from ._collect import SuitePlugin  # torch and the registry load here, not before

    config.pluginmanager.register(
        SuitePlugin(variants, _split(config.getoption("attnreg_dtypes")) or None,
                    config.getoption("attnreg_xfail"), config.getoption("attnreg_device")),
        "attnreg-conformance-suite",
    )
