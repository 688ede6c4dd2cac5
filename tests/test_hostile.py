"""Hostile clients the fuzzer found, or that need a set-up of their own.

Each test is one way a client could hold a session past its timeouts or make
spamgate do work out of proportion; docs/security.md points here.
"""

from __future__ import annotations

import asyncio
import time

from .conftest import GateFactory
from .test_limits import limits


async def test_starttls_then_silence_is_bounded_by_the_idle_timeout(
    gate_factory: GateFactory, tls_files
) -> None:
    """Found by the fuzzer: STARTTLS with plaintext pipelined behind it. That
    plaintext is thrown away (CVE-2011-0411), so the handshake waited for a
    ClientHello that never came: asyncio's own 60 s, not idle_timeout."""
    gate = await gate_factory(tls_files.toml + limits(idle_timeout=0.5))
    for tail in (b"EHLO client.test\r\n", b""):
        c, _ = await gate.client()
        await c.cmd("EHLO client.test")
        await c.send(b"STARTTLS\r\n" + tail)
        assert (await c.reply()).code == 220
        started = time.monotonic()
        assert await c.closed(timeout=5)
        assert time.monotonic() - started < 2
    async with asyncio.timeout(5):  # and the sessions are gone
        while gate.server.runtime.active:
            await asyncio.sleep(0.02)
