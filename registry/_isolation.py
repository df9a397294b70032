"""What running a plugin's code may not do to the process: exit it, or change torch's global state.

Plugins load lazily, at the first use of attnreg, which can be anywhere in a user's program:
after ``torch.manual_seed``, inside ``torch.no_grad()``, after ``torch.set_num_threads``. So
whatever a plugin's import or hook changes in torch's process-wide (or thread-wide) state would
leak into the user's computation at a point they did not choose. ``TorchStateGuard`` snapshots
that state before each plugin's code runs, compares it afterwards, restores what it can and
names every change, so that ``attnreg doctor`` / ``attnreg list`` can report it and strict mode
can refuse it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TorchStateGuard", "describe_exception", "normalize_name"]

_SEPARATORS = re.compile(r"[-_.]+")


def normalize_name(name: str) -> str:
    """A distribution or entry-point name as pip compares them (PEP 503): case-insensitive,
    runs of ``-``, ``_`` and ``.`` equivalent (``My_Plugin.x`` == ``my-plugin-x``)."""
    return _SEPARATORS.sub("-", name.strip()).lower()


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, saying so when the plugin tried to exit the process."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r}); attnreg did not exit"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Setting:
    """One piece of torch's global state: how to read it and, if possible, to put it back."""

    name: str
    get: Callable[[], Any]
    set: Callable[[Any], Any] | None


def _settings() -> list[_Setting]:
    import torch

    def deterministic() -> tuple[bool, bool]:
        return (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())

    def backend_flag(path: str, obj: Any, attr: str) -> _Setting:
        return _Setting(path, lambda: getattr(obj, attr), lambda v: setattr(obj, attr, v))

    return [
        _Setting("num_threads", torch.get_num_threads, torch.set_num_threads),
        # Settable only before any inter-op work has started: reported, put back if torch allows.
        _Setting("num_interop_threads", torch.get_num_interop_threads, torch.set_num_interop_threads),
        _Setting("default_dtype", torch.get_default_dtype, torch.set_default_dtype),
        _Setting("default_device", torch.get_default_device, torch.set_default_device),
        _Setting("grad_enabled", torch.is_grad_enabled, torch.set_grad_enabled),
        _Setting("anomaly_detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
        _Setting("deterministic_algorithms", deterministic,
                 lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        _Setting("float32_matmul_precision", torch.get_float32_matmul_precision,
                 torch.set_float32_matmul_precision),
        backend_flag("cudnn.benchmark", torch.backends.cudnn, "benchmark"),
        backend_flag("cudnn.deterministic", torch.backends.cudnn, "deterministic"),
        backend_flag("cudnn.allow_tf32", torch.backends.cudnn, "allow_tf32"),
        backend_flag("cuda.matmul.allow_tf32", torch.backends.cuda.matmul, "allow_tf32"),
        # Initialising CUDA at import is slow and makes the process unsafe to fork; not undoable.
        _Setting("cuda_initialized", torch.cuda.is_initialized, None),
    ]


class TorchStateGuard:
    """Snapshot of torch's global state; ``restore()`` puts back what changed and names it.

    Covers the CPU RNG (seed and state), the CUDA RNGs if CUDA was initialised before, thread
    counts, default dtype and device, grad mode, anomaly detection, deterministic algorithms,
    matmul precision and the cuDNN / TF32 flags. Reading them initialises nothing.
    """

    def __init__(self) -> None:
        import torch

        self._settings = _settings()
        self._values = [s.get() for s in self._settings]
        self._seed = torch.initial_seed()
        self._rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> list[str]:
        """Undo every change since the snapshot; one line per change (empty if none)."""
        import torch

        changes: list[str] = []
        for setting, before in zip(self._settings, self._values, strict=True):
            after = setting.get()
            if after == before:
                continue
            changes.append(f"{setting.name} {before!r} -> {after!r}" + _put_back(setting.set, before))
        if torch.initial_seed() != self._seed:
            changes.append(f"RNG reseeded (initial_seed {self._seed} -> {torch.initial_seed()})"
                           + _put_back(torch.set_rng_state, self._rng))
        elif not torch.equal(torch.get_rng_state(), self._rng):
            changes.append("RNG state advanced (random numbers drawn from the global generator)"
                           + _put_back(torch.set_rng_state, self._rng))
        if self._cuda_rng is not None:
            now = torch.cuda.get_rng_state_all()
            if len(now) != len(self._cuda_rng) or any(
                not torch.equal(a, b) for a, b in zip(now, self._cuda_rng, strict=True)
            ):
                changes.append("CUDA RNG state changed"
                               + _put_back(torch.cuda.set_rng_state_all, self._cuda_rng))
        return changes


def _put_back(setter: Callable[[Any], Any] | None, value: Any) -> str:
    if setter is None:
        return " (cannot be undone)"
    try:
        setter(value)
    except Exception as exc:  # noqa: BLE001 - e.g. inter-op threads once work has started
        return f" (could not restore: {type(exc).__name__}: {exc})"
    return " (restored)"
