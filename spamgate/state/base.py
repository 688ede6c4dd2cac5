"""The state store interface: the few operations stateful checks need, all atomic.

Rate limits, greylisting and reputation memory need state that outlives a session
and, on a site with several instances, is shared by all of them. They use only the
operations below, so the in-process store and the Redis store are interchangeable
and each operation is one atomic step in either: one Lua script or one command in
Redis, one stretch of code without an `await` in the process. Concurrent sessions,
on one instance or several, therefore never double-count and never both take the
last unit of a quota.

Time is the store's own: the Redis store reads the server's clock inside its
scripts, so instances whose clocks differ still agree on windows and ages.
"""

from __future__ import annotations

import abc
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..model import IPAddress

# A sliding window is kept as this many sub-counters ("slots") of equal width, so
# its memory does not grow with the limit: an event is forgotten between
# (SLOTS-1)/SLOTS and 1 window after it happened.
SLOTS = 60


class StoreUnavailable(Exception):
    """The store cannot answer now (Redis down or slow); `[state] on_unavailable` applies."""


@dataclass(frozen=True, slots=True)
class Window:
    """One sliding-window counter to test and add to.

    `limit` None counts without a limit (to learn, not to refuse); `cost` 0 only
    reads the count.
    """

    key: str
    seconds: float
    limit: int | None = None
    cost: int = 1

    @property
    def millis(self) -> int:
        return max(1, round(self.seconds * 1000))


@dataclass(frozen=True, slots=True)
class Hit:
    """The answer to `StateStore.hit`.

    `exceeded` is the index of the first window the call would have taken over its
    limit; then nothing was counted in any window. `counts` are the events in each
    window after the call.
    """

    exceeded: int | None
    counts: tuple[int, ...]

    @property
    def allowed(self) -> bool:
        return self.exceeded is None


def slot_geometry(window_ms: int) -> tuple[int, int]:
    """(slot width in ms, number of slots) for a window: shared by both stores."""
    width = max(1, window_ms // SLOTS)
    return width, math.ceil(window_ms / width)


class StateStore(abc.ABC):
    """Operations on keys; the store adds its own prefix (Redis) to each key."""

    kind: ClassVar[str]

    @abc.abstractmethod
    async def hit(self, windows: Sequence[Window]) -> Hit:
        """Add each window's cost unless one of them would exceed its limit (all or none)."""

    @abc.abstractmethod
    async def first_seen(self, key: str, ttl: float) -> float:
        """Seconds since `key` was first seen; 0.0 and remembered for `ttl` if it is new."""

    @abc.abstractmethod
    async def mark(self, key: str, ttl: float) -> None:
        """Remember `key` for `ttl` seconds (from now, also when it was already marked)."""

    @abc.abstractmethod
    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        """Which of `keys` are marked (one round trip for all)."""

    @abc.abstractmethod
    async def unmark(self, keys: Sequence[str]) -> None:
        """Forget marks (and anything else) stored under `keys`."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable (calls fail fast)."""
        return True

    @abc.abstractmethod
    def describe(self) -> str:
        """For the log: which store, where (never a password)."""

    async def aclose(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections and background tasks."""


# -- what checks share ----------------------------------------------------------------


def network_of(address: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network ("192.0.2.0/24", "2001:db8::/64"), the unit spammers rotate in."""
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def prefix_check(bits: int):
    """A validator for an IPv4 (32) or IPv6 (128) prefix length."""

    def check(value: int) -> str | None:
        return None if 0 < value <= bits else f"must be between 1 and {bits}"

    return check
