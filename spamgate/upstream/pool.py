"""Idle upstream connections kept for the next client sessions ([upstream] pool_size).

A connection whose client session ended cleanly waits here, newest last, for the
next session, which introduces its own client with XCLIENT; the oldest are closed
after `pool_idle_timeout` seconds, politely (QUIT) and in the background. What
makes a connection fit to wait here is the session's to say (`reusable`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Generic, Protocol, TypeVar


class Pooled(Protocol):
    """What the pool needs of a connection."""

    pooled_at: float

    @property
    def usable(self) -> bool: ...

    def abandon(self) -> None:
        """Close at once, without a word (the connection is gone or broken)."""

    async def quit(self) -> None:
        """Say QUIT and close."""


T = TypeVar("T", bound=Pooled)


class Pool(Generic[T]):
    """Idle upstream sessions, newest last; the oldest are closed after `idle` seconds."""

    def __init__(self, size: int, idle: float) -> None:
        self.size = size
        self.idle_timeout = idle
        self.idle: collections.deque[T] = collections.deque()
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def take(self) -> T | None:
        now = time.monotonic()
        while self.idle:
            session = self.idle.pop()
            if session.usable and now - session.pooled_at < self.idle_timeout:
                return session
            self.retire(session)
        return None

    def put(self, session: T) -> bool:
        if len(self.idle) >= self.size:
            return False
        session.pooled_at = time.monotonic()
        self.idle.append(session)
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_timeout / 2, self._reap)
        return True

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        while self.idle and now - self.idle[0].pooled_at >= self.idle_timeout:
            self.retire(self.idle.popleft())
        if self.idle:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_timeout / 2, self._reap)

    def retire(self, session: T) -> None:
        """Close a connection that leaves the pool, politely and in the background."""
        if not session.usable:
            session.abandon()
            return
        task = asyncio.ensure_future(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def clear(self) -> None:
        while self.idle:
            self.retire(self.idle.pop())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
