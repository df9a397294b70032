"""pytest-benchmark cases over the registry, on the same harness code as ``attnreg bench``.

    pytest benchmarks/ --benchmark-only                                  # every variant, L=1024,4096
    pytest benchmarks/ --benchmark-only --bench-variants 'local:window=256;linear' --bench-lengths 4K,16K

Not collected by a plain ``pytest`` (``testpaths = ["tests"]``). Options:
``--bench-variants`` (names, aliases or ``name:field=value``; ``;`` separates specs that contain
commas), ``--bench-lengths``, ``--bench-modes``, ``--bench-causal`` (both|yes|no),
``--bench-threads``, ``--bench-max-memory``, ``--bench-point-budget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("attnreg-bench", "attnreg benchmark cases")
    group.addoption("--bench-variants", default=None, help="variants (default: all registered)")
    group.addoption("--bench-lengths", default="1024,4096", help="sequence lengths")
    group.addoption("--bench-modes", default="fwd,fwdbwd", help="fwd, fwdbwd")
    group.addoption("--bench-causal", default="both", choices=("both", "yes", "no"))
    group.addoption("--bench-threads", default=None, type=int, help="torch threads")
    group.addoption("--bench-max-memory", default=None, help="per-point memory budget, e.g. 8G")
    group.addoption("--bench-point-budget", default=30.0, type=float, help="seconds per call")


@dataclass(frozen=True)
class Case:
    """One benchmark case: a point of the harness (``kind`` as in ``attnreg.bench.cases.Job``)."""

    kind: str
    label: str | None
    length: int
    mode: str
    causal: bool
    baseline: str | None = None

    @property
    def id(self) -> str:
        from attnreg.bench.cases import MASKED

        who = "sdpa" if self.kind == "sdpa" else self.label or ""
        if self.kind in MASKED:
            who = f"{self.kind}[{self.label}]"
        elif self.kind == "baseline":
            who = f"{self.label}:{self.baseline}"
        return f"{who}-{self.mode}{'-causal' if self.causal else ''}-L{self.length}"


def _settings(config: Any) -> Any:
    from attnreg.bench import BenchSettings, parse_lengths
    from attnreg.bench.settings import parse_bytes

    opts: dict[str, Any] = dict(
        lengths=parse_lengths(config.getoption("--bench-lengths")),
        modes=tuple(m.strip() for m in config.getoption("--bench-modes").split(",") if m.strip()),
        causal={"both": None, "yes": True, "no": False}[config.getoption("--bench-causal")],
        max_call_s=config.getoption("--bench-point-budget"),
    )
    if config.getoption("--bench-threads"):
        opts["threads"] = config.getoption("--bench-threads")
    if config.getoption("--bench-max-memory"):
        opts["max_memory"] = parse_bytes(config.getoption("--bench-max-memory"))
    return BenchSettings(**opts)


def _choices(config: Any, settings: Any) -> list[Any]:
    import attnreg
    from attnreg.bench import parse_variant

    raw = config.getoption("--bench-variants")
    if raw is None:  # dot_product is the `sdpa` case of every group (the same kernel)
        names = [n for n in attnreg.list_variants() if n != "dot_product"]
    else:
        sep = ";" if ";" in raw else ("," if ":" not in raw else ";")
        names = [n.strip() for n in raw.split(sep) if n.strip()]
    return [parse_variant(n, settings.heads, settings.head_dim) for n in names]


def pytest_generate_tests(metafunc: Any) -> None:
    if "case" not in metafunc.fixturenames:
        return
    from attnreg.bench.cases import MASKED

    settings = _settings(metafunc.config)
    choices = _choices(metafunc.config, settings)
    metafunc.config._attnreg_bench = (settings, {c.label: c for c in choices})
    cases = []
    for length in settings.lengths:
        for mode in settings.modes:
            for causal in settings.causal_flags(True):
                cases.append(Case("sdpa", None, length, mode, causal))
                for c in choices:
                    if causal not in settings.causal_flags(c.spec.capabilities.causal):
                        continue
                    cases.append(Case("variant", c.label, length, mode, causal))
                    module = c.spec.factory(c.config)
                    if callable(getattr(module, "pattern_mask", None)):  # float and bool mask forms
                        cases += [Case(k, c.label, length, mode, causal)
                                  for k in MASKED]
                    baselines = getattr(module, "benchmark_baselines", None)
                    for b in sorted(baselines()) if callable(baselines) else []:
                        cases.append(Case("baseline", c.label, length, mode, causal, b))
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench_context(request: Any) -> Any:
    """(settings, choices by label, a Prober, a gate cache) shared by every case."""
    from attnreg.bench import Prober

    settings, choices = request.config._attnreg_bench
    preload = tuple(c.spec.factory.__module__ for c in choices.values())
    prober = Prober(settings.threads, settings.max_memory, settings.max_call_s, preload)
    return settings, choices, prober, {}
