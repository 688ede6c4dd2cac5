"""A check's deadline, armed only if the check has to wait.

`asyncio.timeout` schedules a timer on entry and cancels it on exit: about 3 us a
check on the event loop, for every check of every stage. Many checks answer
without ever waiting (rule tables, relay control, a DNS answer the cache holds,
every check of a replay that reads the record's answers): a timer can interrupt
a coroutine only where it waits, so such a check can never time out, and its
timer would be scheduled only to be cancelled.

`within` therefore runs the check's coroutine up to its first wait itself. If it
finished, there was nothing to time; if it waits, the rest runs under
`asyncio.timeout_at` with the deadline counted from when the check started, so a
check that took long before it first waited is cancelled at that wait, as it
would have been under `asyncio.timeout`. Cancellation, exceptions and the values
the event loop sends are passed to the coroutine exactly as an `await` would.
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


async def within(coro: Coroutine[Any, Any, T], seconds: float) -> T:
    """`await coro` under a deadline of `seconds` (TimeoutError when it passes)."""
    started = time.monotonic()
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return done.value  # answered without waiting: nothing to time
    left = seconds - (time.monotonic() - started)
    async with asyncio.timeout(left):
        return await _resume(coro, waiting)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], waiting: Any) -> Generator[Any, Any, T]:
    """The rest of a coroutine already run to its first wait (`waiting`, what it
    yielded to the event loop): `yield from`, after a first step taken outside."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError, above all
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as done:
                return done.value
