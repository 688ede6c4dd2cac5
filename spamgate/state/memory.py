"""The in-process state store: the default, nothing to set up, shared by nobody.

Every operation runs without an `await`, so on one event loop each is atomic.
Memory is bounded twice: every entry expires (lazily, when it is next read or
when it reaches the old end of the LRU order), and at most `max_keys` entries
are kept, the least recently used going first. Several instances or worker
processes each have their own: use the Redis store to share.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import metrics
from .base import Hit, StateStore, Window, slot_geometry


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Entry:
    expires: int  # ms on the store's clock
    value: int = 0  # first-seen time (ms) or 1 for a mark
    slots: dict[int, int] = field(default_factory=dict)  # slot index -> events


class MemoryStore(StateStore):
    kind = "memory"

    def __init__(self, max_keys: int = 200000, clock: Callable[[], int] = _monotonic_ms) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        metrics.STATE_UP.set(1)

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str, now: int) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _put(self, key: str, entry: _Entry, now: int) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_keys:
            _, old = self._entries.popitem(last=False)
            if old.expires > now:
                metrics.STATE_EVICTIONS.inc()

    async def hit(self, windows: Sequence[Window]) -> Hit:
        now = self._clock()
        current: list[tuple[_Entry | None, int, int]] = []
        counts: list[int] = []
        exceeded: int | None = None
        for i, w in enumerate(windows):
            width, n = slot_geometry(w.millis)
            cur = now // width
            entry = self._get(w.key, now)
            total = 0
            if entry is not None:
                for slot in [s for s in entry.slots if s <= cur - n or s > cur]:
                    del entry.slots[slot]
                total = sum(entry.slots.values())
            current.append((entry, cur, width))
            counts.append(total)
            if exceeded is None and w.limit is not None and total + w.cost > w.limit:
                exceeded = i
        if exceeded is None:
            for i, (w, (entry, cur, width)) in enumerate(zip(windows, current, strict=True)):
                if w.cost <= 0:
                    continue
                if entry is None:
                    entry = _Entry(expires=0)
                    self._put(w.key, entry, now)
                entry.slots[cur] = entry.slots.get(cur, 0) + w.cost
                entry.expires = now + w.millis + width
                counts[i] += w.cost
        return Hit(exceeded, tuple(counts))

    async def first_seen(self, key: str, ttl: float) -> float:
        now = self._clock()
        entry = self._get(key, now)
        if entry is None:
            self._put(key, _Entry(expires=now + _ms(ttl), value=now), now)
            return 0.0
        return (now - entry.value) / 1000

    async def mark(self, key: str, ttl: float) -> None:
        now = self._clock()
        self._put(key, _Entry(expires=now + _ms(ttl), value=1), now)

    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        now = self._clock()
        return tuple(self._get(k, now) is not None for k in keys)

    async def unmark(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._entries.pop(k, None)

    async def ping(self) -> None:
        return None

    def describe(self) -> str:
        return f"in-process, not shared with other instances (at most {self.max_keys} keys)"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
