"""A small least-recently-used cache that threads sharing one module can use at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most ``size`` entries, the least recently used evicted first.

    Modules are shared by threads (one model serving several requests): a lookup followed by
    ``move_to_end`` races with another thread's eviction of the same key, so every dict
    operation holds the lock. Values are built outside it (two threads missing the same key at
    once both build; the entry is the same either way). A copied or pickled module starts with
    an empty cache: entries are derived data, not state.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[LRUCache], tuple[int]]:
        return (LRUCache, (self.size,))  # the lock cannot be copied; the entries need not be

    def __getitem__(self, key: Hashable) -> V:
        with self._lock:
            return self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``build()`` stored under it."""
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
                return hit
        value = build()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value
