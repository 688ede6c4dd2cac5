"""Work a session starts but must not wait for: learning from a transaction's outcome.

A reputation update is a store write (a Redis round trip) that no client reply
depends on, so the flow hands it here instead of delaying the reply. The tasks are
tracked so that a failure is logged rather than lost, their number is bounded so a
slow store cannot pile them up without limit, and shutdown waits for them (`drain`).
Each runs in an empty `contextvars` context: it is no session's work any more, so
nothing it asks is written into a session's capture record (`capture.recording`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

from . import metrics

log = logging.getLogger("spamgate")

MAX_PENDING = 10000


class Background:
    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        if len(self._tasks) >= self.max_pending:
            coro.close()
            metrics.BACKGROUND_DROPPED.inc()
            log.warning("dropped %s: %d background tasks pending", what, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(
            coro, name=what, context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for pending tasks (at most `timeout` seconds), then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
