"""A check's deadline: no timer for a check that never waits, the same deadline as
`asyncio.timeout` for one that does, and cancellation passed through."""

from __future__ import annotations

import asyncio
import time

import pytest

from spamgate.pipeline.deadline import within


async def answers_at_once() -> str:
    return "at once"


async def waits(seconds: float, steps: int = 1) -> str:
    for _ in range(steps):
        await asyncio.sleep(seconds / steps)
    return "waited"


async def test_a_check_that_never_waits_arms_no_timer() -> None:
    loop = asyncio.get_running_loop()
    armed = []
    call_at = loop.call_at

    def spy(when, callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        armed.append(when)
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = spy  # type: ignore[method-assign]
    try:
        assert await within(answers_at_once(), 5.0) == "at once"
        assert armed == []
        assert await within(waits(0.001), 5.0) == "waited"
        assert len(armed) >= 1  # the deadline (and the sleep)
    finally:
        loop.call_at = call_at  # type: ignore[method-assign]


async def test_an_exception_before_the_first_wait_is_the_checks() -> None:
    async def broken() -> str:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await within(broken(), 5.0)


async def test_a_check_that_waits_too_long_times_out_and_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(slow(), 0.05)
    assert time.monotonic() - started < 2 and cancelled.is_set()


async def test_the_deadline_counts_from_the_start_not_the_first_wait() -> None:
    async def busy_then_waits() -> str:
        time.sleep(0.1)  # past its deadline before it ever waits
        await asyncio.sleep(0)  # cancelled here, as asyncio.timeout would
        await asyncio.sleep(0)
        return "late"

    with pytest.raises(TimeoutError):
        await within(busy_then_waits(), 0.05)


async def test_values_and_exceptions_reach_the_check_across_waits() -> None:
    loop = asyncio.get_running_loop()

    async def several() -> list[object]:
        got: list[object] = []
        for i in range(3):
            f = loop.create_future()
            loop.call_soon(f.set_result, i)
            got.append(await f)
        f = loop.create_future()
        loop.call_soon(f.set_exception, KeyError("k"))
        try:
            await f
        except KeyError as exc:
            got.append(repr(exc))
        got.append(await waits(0.001, steps=3))
        return got

    assert await within(several(), 5.0) == [0, 1, 2, "KeyError('k')", "waited"]


async def test_a_check_catching_its_timeout_may_still_answer() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "caught"
        return "late"

    # As under asyncio.timeout: the check swallowed the cancellation, so its
    # answer stands (and the task is not left cancelled).
    assert await within(stubborn(), 0.02) == "caught"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_an_outer_cancellation_reaches_the_check() -> None:
    reached = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            reached.set()
            raise
        return "late"

    task = asyncio.ensure_future(within(slow(), 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached.is_set()
