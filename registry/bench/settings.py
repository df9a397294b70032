"""What a benchmark run measures: sizes, modes, guards, and the selected variants."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from attnreg.core import AttentionConfig, ConfigError, VariantSpec
from attnreg.core.dtypes import DTYPE_NAMES

from .records import SettingsRecord

__all__ = [
    "DEFAULT_LENGTHS",
    "QUICK_LENGTHS",
    "BenchSettings",
    "VariantChoice",
    "default_max_memory",
    "parse_lengths",
    "parse_variant",
]

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (32, 64)
MODES = ("fwd", "fwdbwd", "decode")
DEFAULT_MODES = ("fwd", "fwdbwd")


def default_max_memory() -> int:
    """Half of the machine's RAM in bytes (``MemTotal`` of /proc/meminfo; 8 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2**30


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"1024,4K,16k"`` -> (1024, 4096, 16384), sorted and unique."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise ConfigError(f"--lengths: {part!r} is not an integer (expected e.g. 1024,4K)") from None
        if value < 1:
            raise ConfigError(f"--lengths: {value} must be >= 1")
        out.append(value)
    if not out:
        raise ConfigError("--lengths: expected at least one length, e.g. 1024,4096")
    return tuple(sorted(set(out)))


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GB"`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ConfigError(f"--max-memory: {text!r} is not a size (expected e.g. 8G, 512M)") from None


@dataclass(frozen=True)
class VariantChoice:
    """One variant to benchmark: its spec, the exact config, and the label used in reports."""

    label: str
    spec: VariantSpec
    config: AttentionConfig
    max_length: int | None = None  # ``NAME@4K``: lengths above this are not planned for it
    only: frozenset[tuple[str, bool, int]] | None = None  # (mode, causal, L) to plan; None = all

    def wants(self, mode: str, causal: bool, length: int) -> bool:
        """Whether the point (mode, causal, L) is planned for this variant (before capabilities)."""
        if self.max_length is not None and length > self.max_length:
            return False
        return self.only is None or (mode, causal, length) in self.only

    @property
    def is_dense_sdpa(self) -> bool:
        """Whether this is the built-in SDPA variant (its FLOP count is the dense one)."""
        return self.spec.name == "dot_product"


def _value(text: str) -> Any:
    """A field value from the command line, typed like YAML (``3`` -> int, ``true`` -> bool)."""
    return yaml.safe_load(text)


def parse_variant(text: str, heads: int, head_dim: int) -> VariantChoice:
    """``"local"``, ``"local:window=256,dropout=0"`` or ``"additive@4K"`` (measured up to L=4096
    only) -> a validated ``VariantChoice``.

    Learnable variants get ``num_heads`` / ``head_dim`` from the benchmark sizes unless given.
    """
    import attnreg

    spec_text, at, cap = text.partition("@")
    max_length = None
    if at:
        try:
            (max_length,) = parse_lengths(cap)
        except (ConfigError, ValueError):
            raise ConfigError(f"variant {text!r}: expected NAME[:fields]@MAXLEN, e.g. additive@4K") from None
    name, _, rest = spec_text.partition(":")
    fields: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"variant {text!r}: expected NAME:field=value[,field=value], got {item!r}")
        fields[key.strip()] = _value(val.strip())
    spec = attnreg.get_variant(name.strip())
    sized = dict(fields)
    for key, val in (("num_heads", heads), ("head_dim", head_dim)):
        if key in spec.config.model_fields and key not in sized:
            sized[key] = val
    config = attnreg.validate_config({**sized, "variant": spec.name})
    shown = ",".join(f"{k}={v}" for k, v in fields.items())
    label = name.strip() + (f"({shown})" if shown else "")
    return VariantChoice(label=label, spec=spec, config=config, max_length=max_length)


@dataclass(frozen=True)
class BenchSettings:
    """Every knob of a run; stored verbatim in ``results.json``."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    threads: int = field(default_factory=lambda: max(1, torch.get_num_threads()))
    modes: tuple[str, ...] = DEFAULT_MODES
    causal: bool | None = None  # None: both where the variant supports causal
    max_memory: int = field(default_factory=default_max_memory)  # bytes, per point (whole process)
    max_call_s: float = 30.0  # per-point budget: skip variant points whose single call would take longer
    max_baseline_call_s: float = 20.0  # the same for baseline points (dense SDPA, naive formulas)
    target_s: float = 0.5  # time spent on repeats per point
    time_limit_s: float | None = None  # whole run: points after this are skipped (None: no limit)
    slow_s: float = 3.0  # a first call slower than this is the only sample
    fit_min: int = 4096  # scaling exponents fit over lengths >= this (all when fewer than 2)
    gate_length: int = 300  # longer than default windows/blocks, not a multiple of them
    # The gate also runs at the longest benchmarked length capped at this (0 = off): a variant's
    # fast path may only start above gate_length (local window=256 is dense at L=300).
    long_gate_max: int = 2048
    seed: int = 0
    quick: bool = False
    # Time SDPA with each variant's pattern and the variants' own naive baselines (off for the
    # speed guard, which compares speedups over plain dense SDPA only).
    baselines: bool = True
    roof: bool = True  # time a dense GEMM at the start and end (the roof of the GFLOP/s ratios)
    # Time each variant point alternately with dense SDPA in one process (speedup "sdpa_paired"),
    # instead of as a separate SDPA point: the speed guard's robust ratio on a busy machine.
    paired: bool = False
    # Skip a point whose estimated call time exceeds the budget (False: measure it and let the
    # watchdog kill a call that overruns; for presets whose points are known to fit, where an
    # estimate from noisy small calibration calls must not drop a point).
    skip_by_time_estimate: bool = True
    preset: str | None = None  # "ci" for the speed guard's preset (see presets.py)

    def __post_init__(self) -> None:
        if not isinstance(self.long_gate_max, int) or self.long_gate_max < 0:
            raise ConfigError(f"bench setting long_gate_max must be an integer >= 0, "
                              f"got {self.long_gate_max!r}")
        for name in ("batch", "heads", "head_dim", "threads", "gate_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                got = getattr(self, name)
                raise ConfigError(f"bench setting {name} must be an integer >= 1, got {got!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"--modes {','.join(self.modes)!r}: expected a subset of {','.join(MODES)}")
        if self.modes == ("decode",) and self.causal is False:
            raise ConfigError("--modes decode is causal by definition: drop --no-causal")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ConfigError(f"lengths must be positive, got {self.lengths}")
        if min(self.max_memory, self.max_call_s, self.max_baseline_call_s, self.target_s) <= 0:
            raise ConfigError("--max-memory, the per-point time budget and the repeat target must be > 0")

    @classmethod
    def quick_settings(cls, **overrides: Any) -> BenchSettings:
        """Tiny sizes and short budgets: a smoke test that finishes in seconds."""
        base: dict[str, Any] = dict(
            lengths=QUICK_LENGTHS, heads=2, head_dim=16, target_s=0.01, slow_s=0.5, threads=1,
            max_call_s=10.0, max_baseline_call_s=10.0, fit_min=1, gate_length=100, quick=True,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def long_gate_length(self) -> int | None:
        """Length of the second gate: the longest benchmarked length capped at ``long_gate_max``
        (the longer, the more fast paths have started: local window=256 is still dense at 512),
        or None when that is not longer than ``gate_length``."""
        n = min(max(self.lengths), self.long_gate_max)
        return n if n > self.gate_length else None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of ``dtype``."""
        return DTYPE_NAMES[self.dtype]

    def causal_flags(self, supports_causal: bool, mode: str | None = None) -> tuple[bool, ...]:
        """The causal flags to measure for a variant that does / does not support causal (in
        ``mode``: decoding is always causal)."""
        if mode == "decode":
            return (True,) if supports_causal and self.causal is not False else ()
        flags = (False, True) if self.causal is None else (self.causal,)
        return tuple(c for c in flags if supports_causal or not c)

    def as_json(self) -> SettingsRecord:
        """Plain-JSON form for ``results.json``."""
        d: SettingsRecord = dict(self.__dict__)  # type: ignore[assignment]
        d["lengths"] = list(self.lengths)
        d["modes"] = list(self.modes)
        d["cpu_count"] = os.cpu_count()
        return d
