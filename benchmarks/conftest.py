"""pytest-benchmark cases over the registry, on the same harness code as ``attnreg bench``.

    pytest benchmarks/ --benchmark-only                                  # every variant, L=2048
    pytest benchmarks/ --benchmark-only --bench-variants 'local:window=256;linear' --bench-lengths 4K,16K

Not collected by a plain ``pytest`` (``testpaths = ["tests"]``). Options:
``--bench-variants`` (names, aliases or ``name:field=value``; ``;`` separates specs that contain
commas), ``--bench-lengths``, ``--bench-modes``, ``--bench-causal`` (both|yes|no),
``--bench-threads``, ``--bench-max-memory``, ``--bench-point-budget``, ``--bench-baseline-budget``,
``--bench-repeat-time``. Points that cannot fit the memory or time budgets are skipped with the
reason (the same estimates as ``attnreg bench``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("attnreg-bench", "attnreg benchmark cases")
    group.addoption("--bench-variants", default=None, help="variants (default: all registered)")
    group.addoption("--bench-lengths", default="2048", help="sequence lengths (default 2048)")
    group.addoption("--bench-modes", default="fwd,fwdbwd", help="fwd, fwdbwd")
    group.addoption("--bench-causal", default="both", choices=("both", "yes", "no"))
    group.addoption("--bench-threads", default=None, type=int, help="torch threads")
    group.addoption("--bench-max-memory", default=None, help="per-point memory budget, e.g. 8G")
    # Defaults sized for a default run of a few minutes on 2 cores (docs/benchmarks.md).
    group.addoption("--bench-point-budget", default=10.0, type=float,
                    help="skip variant points whose single call would take longer, in s (default 10)")
    group.addoption("--bench-baseline-budget", default=10.0, type=float,
                    help="the same for baselines: dense SDPA, naive formulas (default 10)")
    group.addoption("--bench-repeat-time", default=0.2, type=float,
                    help="seconds of timed repeats per case (default 0.2)")


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
    def series(self) -> str:
        """The series name ``attnreg bench`` gives the same point (``sdpa``, ``local``,
        ``sdpa_masked[local]``, ``additive:naive``)."""
        from attnreg.bench.cases import MASKED

        if self.kind in MASKED:
            return f"{self.kind}[{self.label}]"
        if self.kind == "baseline":
            return f"{self.label}:{self.baseline}"
        return "sdpa" if self.kind == "sdpa" else self.label or ""

    @property
    def id(self) -> str:
        return f"{self.series}-{self.mode}{'-causal' if self.causal else ''}-L{self.length}"


def _settings(config: Any) -> Any:
    from attnreg.bench import BenchSettings, parse_lengths
    from attnreg.bench.settings import parse_bytes

    opts: dict[str, Any] = dict(
        lengths=parse_lengths(config.getoption("--bench-lengths")),
        modes=tuple(m.strip() for m in config.getoption("--bench-modes").split(",") if m.strip()),
        causal={"both": None, "yes": True, "no": False}[config.getoption("--bench-causal")],
    )
    for key, option in (("max_call_s", "--bench-point-budget"), ("target_s", "--bench-repeat-time"),
                        ("max_baseline_call_s", "--bench-baseline-budget")):
        if config.getoption(option) is not None:
            opts[key] = config.getoption(option)
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
                    if "pattern_mask" in module.benchmark_hooks():  # float and bool mask forms
                        cases += [Case(k, c.label, length, mode, causal)
                                  for k in MASKED]
                    for b in sorted(module.benchmark_baselines()):
                        cases.append(Case("baseline", c.label, length, mode, causal, b))
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench_context(request: Any) -> Any:
    """(settings, choices by label, a Prober, a gate cache, the feasibility guard) shared by every
    case: the same estimates as ``attnreg bench`` skip the points that cannot fit."""
    from attnreg.bench import Prober
    from attnreg.bench.feasibility import Feasibility

    settings, choices = request.config._attnreg_bench
    preload = tuple(c.spec.factory.__module__ for c in choices.values())
    prober = Prober(settings.threads, settings.max_memory, settings.max_call_s, preload)
    return settings, choices, prober, {}, Feasibility(settings, prober)
