"""One bounded least-recently-used cache, safe for threads sharing a module or a process.

Modules are shared by threads (one model serving several requests), and a few memos are
process-wide; a hand-written ``OrderedDict`` LRU races there (a lookup's ``move_to_end`` against
another thread's eviction of the same key raises ``KeyError``). Every cache in attnreg and its
built-in plugins is this class.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["LRUCache", "tensor_nbytes"]

V = TypeVar("V")


def tensor_nbytes(tensor: Any) -> int:
    """Bytes of a tensor's elements (``nbytes_of`` for caches of tensors)."""
    return int(tensor.numel() * tensor.element_size())


class LRUCache(Generic[V]):
    """At most ``entries`` values (and at most ``max_bytes`` of them, if given, as measured by
    ``nbytes_of``), the least recently used evicted first.

    Every dict operation holds the lock; values are built outside it (two threads missing the
    same key at once both build and both get the value kept first: cached values must be pure
    functions of their key). A value bigger than ``max_bytes`` on its own is returned but not
    kept. Cached values are shared: callers must not modify them in place. A copied or pickled
    owner starts with an empty cache: entries are derived data, not state.
    """

    def __init__(self, entries: int, max_bytes: int | None = None,
                 nbytes_of: Callable[[V], int] | None = None) -> None:
        if entries < 1:
            raise ValueError(f"entries must be >= 1, got {entries}")
        if max_bytes is not None and nbytes_of is None:
            raise ValueError("max_bytes needs nbytes_of (how to measure an entry)")
        self.entries = entries
        self.max_bytes = max_bytes
        self._nbytes_of = nbytes_of
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[LRUCache], tuple[object, ...]]:
        # The lock cannot be copied and the entries need not be (``nbytes_of`` must pickle).
        return (LRUCache, (self.entries, self.max_bytes, self._nbytes_of))

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __getitem__(self, key: Hashable) -> V:
        with self._lock:
            return self._data[key]

    @property
    def nbytes(self) -> int:
        """Bytes held, as measured by ``nbytes_of`` (0 without it)."""
        with self._lock:
            return self._bytes

    def values(self) -> list[V]:
        """The cached values, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._data.values())

    def clear(self) -> None:
        """Drop every entry (they are rebuilt on demand)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``build()`` stored under it."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = build()
        size = self._nbytes_of(value) if self._nbytes_of is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return value
        with self._lock:
            if key in self._data:  # another thread built it meanwhile: share one value
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            self._bytes += size
            while len(self._data) > self.entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, dropped = self._data.popitem(last=False)
                self._bytes -= self._nbytes_of(dropped) if self._nbytes_of is not None else 0
        return value
