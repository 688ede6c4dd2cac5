"""Helpers shared by the tests of stateful checks (rate limits, greylisting, reputation)."""

from __future__ import annotations

from tests.kit.smtpclient import Reply

from ..conftest import Gate

BODY = b"Subject: t\r\n\r\nhello\r\n"
STRANGER = "127.0.0.5"  # outside the test mynetworks (127.0.0.1/32)


async def send(
    gate: Gate,
    *,
    source: str = STRANGER,
    sender: str = "a@example.org",
    rcpts: tuple[str, ...] = ("u@example.test",),
) -> list[Reply]:
    """One session with one transaction; every reply, the greeting first.

    Stops where the server closed the session (a 421 greeting).
    """
    c, banner = await gate.client(source=source)
    assert banner is not None
    if banner.code != 220:
        await c.close()
        return [banner]
    replies = [banner, *await c.mail(sender, list(rcpts), BODY)]
    await c.cmd("QUIT")
    await c.close()
    return replies


def codes(replies: list[Reply]) -> list[int]:
    return [r.code for r in replies]
