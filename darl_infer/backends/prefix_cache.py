"""A bounded LRU of recent prefixes' K/V: a repeated query (the next page, a hot query) skips its
prefix pass.

Keys are the prefix token ids with the model's dtype and device; values are immutable `PrefixKV`
(prefix_runner.py), so a hit hands out the very tensors the miss computed (the miss scored its
first items in the prefixes' own pass, the hit in a pass without them: equal up to rounding). The budget is the values' summed tensor bytes; the least recently used entries go
first, and a prefix larger than the whole budget is not kept. Thread-safe: a lock guards the dict
and the counters; prefixes are computed outside it (two threads missing the same prefix at once
both compute it, and the second insert is dropped).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable


class PrefixLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()  # key -> (value, its bytes)
        self._lock = threading.Lock()
        self._bytes = self._hits = self._misses = self._evictions = 0

    def get(self, key: Hashable):
        """The value for `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value) -> None:
        """Keep `value` (anything with `nbytes`), evicting the least recently used entries over budget."""
        size = value.nbytes
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self._hits, "misses": self._misses, "evictions": self._evictions,
                "entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
            }
