"""Running test threads so that races in Python code show up in one short run."""

from __future__ import annotations

import sys
import threading


def start_and_join(threads: list[threading.Thread], timeout: float = 300) -> None:
    """Run ``threads`` with the interpreter switching between them every 10 us (default 5 ms),
    so that races in Python code show up in a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)
    finally:
        sys.setswitchinterval(interval)
