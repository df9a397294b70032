"""Combine several runs of the same preset into one baseline: per variant point, the run whose
speedup over SDPA is the median of all runs (its time, memory and samples kept together).

    python -m attnreg.bench.baseline run1/results.json run2/results.json run3/results.json \\
        -o benchmarks/ci-baseline.json

A single run can itself be disturbed; the median of three or more is the steadier reference.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from attnreg.core import ConfigError

from .compare import COMPARABLE_SETTINGS, sdpa_speedup
from .derive import point_key
from .records import ResultsDoc
from .report import load_results, write_json

__all__ = ["median_baseline", "main"]


def median_baseline(docs: list[ResultsDoc]) -> ResultsDoc:
    """A results document whose variant points are, point by point, the median run's point."""
    if not docs:
        raise ConfigError("median_baseline: no runs given")
    first = docs[0]
    for d in docs[1:]:
        diff = [k for k in (*COMPARABLE_SETTINGS, "preset")
                if d["settings"].get(k) != first["settings"].get(k)]
        if diff:
            raise ConfigError(f"runs differ in {', '.join(diff)}: only runs of the same settings combine")
    out = copy.deepcopy(first)
    points = []
    for p in first["points"]:
        same = [q for d in docs for q in d["points"]
                if q.get("status") == "ok" and point_key(q) == point_key(p) and sdpa_speedup(q)[1]]
        if p.get("kind") != "variant" or not same:  # measured in no run: kept as the first has it
            points.append(p)
            continue
        same.sort(key=lambda q: sdpa_speedup(q)[1])
        points.append({**same[len(same) // 2], "baseline_of_runs": [sdpa_speedup(q)[1] for q in same]})
    out["points"] = points
    out["baseline_runs"] = len(docs)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: the runs, then ``-o`` the baseline to write."""
    ap = argparse.ArgumentParser(prog="python -m attnreg.bench.baseline", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="results.json of each run")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the baseline file to write")
    args = ap.parse_args(argv)
    write_json(median_baseline([load_results(p) for p in args.runs]), args.out)
    print(f"baseline of {len(args.runs)} runs: {args.out}")


if __name__ == "__main__":
    main()
