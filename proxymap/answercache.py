"""A bounded cache of recent answers, for one table instance of one worker.

Postfix's proxymap has no such cache: every request reads the table. Ours
keeps recent answers so that a hot key costs a dictionary look-up instead of
a stat, two flocks and a Berkeley DB read, and so that remote tables
(redis, memcache, ldap) need not ask their server for every request.

An `AnswerCache` maps keys to values (the dispatcher stores encoded
replies; a remote table may store its lookup results, None included). It is
bounded by a number of entries and by bytes (key plus value lengths); when
either bound would be passed, the oldest entries go first (insertion order:
a hit does not reorder, which keeps hits to one dict look-up). Entries can
expire: `ttl` seconds for positive answers and `negative_ttl` for negative
ones (`put(..., negative=True)`; 0 keeps no negative answers at all). With
neither, an entry stays valid until `invalidate()`, which the owner calls
on every change notification or own write for its table (file tables: see
proxymap/filewatch.py). Counters (hits, misses, invalidations, evictions)
are kept per cache and summed per worker by `CacheStats` for `status`.

The clock is injectable so that TTL behaviour is tested without waiting.
"""

from __future__ import annotations

import time

#: returned by get() for a key without a valid entry
MISS = object()


class CacheStats:
    """Counters shared by every cache of a worker (the figures `status`
    shows), plus the caches' current sizes."""

    __slots__ = ("hits", "misses", "invalidations", "evictions")

    def __init__(self):
        self.hits = self.misses = self.invalidations = self.evictions = 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class AnswerCache:
    """Recent answers of one table instance, bounded by entries and bytes."""

    __slots__ = ("max_entries", "max_bytes", "ttl", "negative_ttl", "clock", "stats",
                 "generation", "_entries", "_bytes", "_timed")

    def __init__(self, max_entries: int, max_bytes: int, *, ttl: float | None = None,
                 negative_ttl: float | None = None, clock=time.monotonic,
                 stats: CacheStats | None = None):
        if max_entries <= 0 or max_bytes <= 0:
            raise ValueError("an answer cache needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        # without a TTL of its own, a negative answer lives as long as a positive one
        self.negative_ttl = ttl if negative_ttl is None else negative_ttl
        self.clock = clock
        self.stats = stats if stats is not None else CacheStats()
        # key -> value, or (value, deadline) when entries expire
        self._entries: dict = {}
        self._bytes = 0
        self._timed = ttl is not None or negative_ttl is not None
        #: how many times invalidate() ran: an answer computed while this
        #: changed (off the loop) may predate the change and is not kept
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key, default=MISS):
        """The cached value for key, or `default` (counted as a miss)."""
        entry = self._entries.get(key, MISS)
        if entry is MISS:
            self.stats.misses += 1
            return default
        if self._timed:
            value, deadline = entry
            if deadline is not None and self.clock() >= deadline:
                self._drop(key)
                self.stats.misses += 1
                return default
            entry = value
        self.stats.hits += 1
        return entry

    def peek(self, key):
        """get() for the dispatcher's hot path (caches without TTL): the
        value or None, a hit counted only when found (a miss is counted by
        the get() of the full path that follows)."""
        if self._timed:
            return None
        value = self._entries.get(key)
        if value is not None:
            self.stats.hits += 1
        return value

    @property
    def timed(self) -> bool:
        """Entries expire (a TTL): peek() never answers."""
        return self._timed

    def put_missed(self, key, value) -> None:
        """get() that missed, then put(): for the dispatcher's hot path,
        which read the answer itself after peek() found none."""
        self.stats.misses += 1
        self.put(key, value)

    def put(self, key, value, *, negative: bool = False) -> None:
        """Remember value for key. An entry counts len(key) + len(value)
        bytes (bytes or str, tuples of them; None counts 0, a number 8). A
        negative answer with a negative TTL of 0 is not kept; an entry
        larger than the whole byte bound is not kept either."""
        size = _size(key) + _size(value)
        if size > self.max_bytes:
            return
        if self._timed:
            ttl = self.negative_ttl if negative else self.ttl
            if ttl is not None and ttl <= 0:
                return
            stored = (value, None if ttl is None else self.clock() + ttl)
        else:
            stored = value
        entries = self._entries
        if key in entries:
            self._drop(key)
        while entries and (len(entries) >= self.max_entries
                           or self._bytes + size > self.max_bytes):
            self._drop(next(iter(entries)))
            self.stats.evictions += 1
        entries[key] = stored
        self._bytes += size

    def discard(self, key) -> None:
        """Forget one key (a remote table's own write of that key)."""
        if key in self._entries:
            self._drop(key)

    def invalidate(self) -> None:
        """Forget every entry: the table changed (or may have)."""
        self.generation += 1
        if self._entries:
            self._entries.clear()
            self._bytes = 0
        self.stats.invalidations += 1

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        value = entry[0] if self._timed else entry
        self._bytes -= _size(key) + _size(value)


def _size(item) -> int:
    if item is None:
        return 0
    if isinstance(item, tuple):
        return sum(_size(part) for part in item)
    if isinstance(item, (bytes, bytearray, str)):
        return len(item)
    return 8    # numbers, flags
