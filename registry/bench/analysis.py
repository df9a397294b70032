"""Numbers derived from measured points: scaling exponents, estimates, speedups, crossovers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["fit_exponent", "extrapolate", "crossover", "median", "iqr"]


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _quantile(s: Sequence[float], q: float) -> float:
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def iqr(xs: Sequence[float]) -> float | None:
    """Interquartile range (linear interpolation), None for fewer than 3 samples."""
    if len(xs) < 3:
        return None
    s = sorted(xs)
    return _quantile(s, 0.75) - _quantile(s, 0.25)


MIN_FIT_LENGTHS = 3
"""Distinct lengths a scaling exponent needs: a line through two points always fits perfectly,
so an exponent from two tiny lengths (``memory ~ L^5.04``) says nothing."""


def fit_exponent(points: Iterable[tuple[float, float]], min_x: float = 0.0,
                 min_points: int = MIN_FIT_LENGTHS) -> dict[str, float] | None:
    """Least-squares slope of log(y) against log(x): ``y ~ c * x**exponent``.

    Fits the points with ``x >= min_x`` when there are at least ``min_points`` distinct x,
    otherwise all points. Returns ``{"exponent", "r2", "x_min", "x_max", "n"}``, or None with
    fewer than ``min_points`` distinct positive points.
    """
    pts = sorted((float(x), float(y)) for x, y in points if x > 0 and y is not None and y > 0)
    upper = [p for p in pts if p[0] >= min_x]
    use = upper if len({x for x, _ in upper}) >= min_points else pts
    if len({x for x, _ in use}) < max(2, min_points):
        return None
    lx = [math.log(x) for x, _ in use]
    ly = [math.log(y) for _, y in use]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    slope = sxy / sxx
    ss_tot = sum((b - my) ** 2 for b in ly)
    ss_res = sum((b - (my + slope * (a - mx))) ** 2 for a, b in zip(lx, ly, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": slope, "r2": r2, "x_min": use[0][0], "x_max": use[-1][0], "n": float(len(use))}


def extrapolate(history: Sequence[tuple[int, float]], x: int, lo: float, hi: float,
                floor: float = 0.0) -> float | None:
    """Estimate y at ``x`` from the two largest measured x below it, on a log-log line whose
    slope is clamped to [lo, hi] (values below ``floor`` are raised to it: small-size noise).
    None without history; with one point the slope is ``hi`` (pessimistic)."""
    below = sorted((a, max(b, floor)) for a, b in history if a < x and b is not None)
    if not below:
        return None
    x2, y2 = below[-1]
    slope = hi
    if len(below) >= 2:
        x1, y1 = below[-2]
        if x1 != x2 and y1 > 0 and y2 > 0:
            slope = min(hi, max(lo, math.log(y2 / y1) / math.log(x2 / x1)))
    if y2 <= 0:
        return 0.0
    return y2 * (x / x2) ** slope


def crossover(ratios: Sequence[tuple[int, float]]) -> dict[str, float | str | None]:
    """Where a variant becomes faster than a baseline, from (L, baseline_time / variant_time).

    Returns ``{"length": L*, "kind": ...}``: ``"interpolated"`` (log-log between the last length
    where it was slower and the next one, from which on it stays faster), ``"always"`` (faster
    at every measured length: L* <= the smallest), or ``"never"`` (not faster at the largest).
    """
    pts = sorted((x, r) for x, r in ratios if r is not None and r > 0)
    if not pts:
        return {"length": None, "kind": "unmeasured"}
    if pts[-1][1] <= 1.0:
        return {"length": None, "kind": "never"}
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] > 1.0:
        i -= 1
    if i == 0:
        return {"length": float(pts[0][0]), "kind": "always"}
    (x1, r1), (x2, r2) = pts[i - 1], pts[i]
    t = (0.0 - math.log(r1)) / (math.log(r2) - math.log(r1)) if r2 != r1 else 0.0
    length = math.exp(math.log(x1) + t * (math.log(x2) - math.log(x1)))
    return {"length": length, "kind": "interpolated"}
