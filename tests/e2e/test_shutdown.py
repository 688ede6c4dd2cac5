"""Graceful shutdown: idle sessions go at once, transactions may finish, then 421.

`Server.stop(grace)` is what SIGTERM runs; the last test sends a real SIGTERM to a
`spamgate run` process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kit.ports import free_port
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import Gate, GateFactory

SHUTDOWN = "421 4.3.2 gate.test Error: service shutting down"
BODY = b"Subject: shutdown\r\n\r\nbody\r\n"


async def in_transaction(gate: Gate) -> RawClient:
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    return c


async def silent(c: RawClient, seconds: float) -> bool:
    """True if the server says nothing for `seconds`."""
    try:
        await c.reply(timeout=seconds)
    except TimeoutError:
        return True
    return False


async def test_idle_sessions_are_told_at_once(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    greeted, _ = await gate.client()
    helloed, _ = await gate.client()
    await helloed.cmd("EHLO c.test")
    started = time.monotonic()
    stop = asyncio.create_task(gate.server.stop(grace=10))
    for c in (greeted, helloed):
        assert str(await c.reply(timeout=2)) == SHUTDOWN
        assert await c.closed()
    await asyncio.wait_for(stop, 3)
    assert time.monotonic() - started < 2  # nobody waited for the grace period
    with pytest.raises(OSError):  # the listener is closed
        await RawClient.connect(gate.port, gate.host)


async def test_transaction_may_finish_within_grace(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    busy = await in_transaction(gate)
    idle, _ = await gate.client()
    stop = asyncio.create_task(gate.server.stop(grace=10))
    assert str(await idle.reply(timeout=2)) == SHUTDOWN
    assert await silent(busy, 0.3)  # not interrupted mid-transaction
    assert (await busy.cmd("DATA")).code == 354
    await busy.send(BODY + b".\r\n")
    r = await busy.reply()
    assert (r.code, r.text) == (250, "2.0.0 Ok: queued as SINK")
    assert str(await busy.reply()) == SHUTDOWN  # right after the transaction
    assert await busy.closed()
    await asyncio.wait_for(stop, 3)  # done as soon as the last session is
    assert [m.original for m in sink.messages] == [BODY]


async def test_stragglers_get_421_after_grace(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    between = await in_transaction(gate)  # waiting between commands
    in_data = await in_transaction(gate)  # half way through the message
    assert (await in_data.cmd("DATA")).code == 354
    await in_data.send(b"Subject: half\r\n\r\nhalf a message")
    started = time.monotonic()
    stop = asyncio.create_task(gate.server.stop(grace=0.6))
    for c in (between, in_data):
        assert str(await c.reply(timeout=3)) == SHUTDOWN
        assert await c.closed()
    assert time.monotonic() - started >= 0.55
    await asyncio.wait_for(stop, 3)
    assert sink.messages == []
    assert "DATA" not in sink.commands  # nothing half-sent upstream
    assert gate.server.runtime.active == 0


async def test_message_at_the_upstream_when_grace_ends(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """The upstream is still deciding when time is up: the client gets 421, never
    a 250 spamgate did not hear, and stop() does not wait for the upstream."""
    sink.behaviour.delays["DOT"] = 1.0
    gate = await gate_factory()
    c = await in_transaction(gate)
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b".\r\n")
    await asyncio.sleep(0.2)  # the message is with the upstream now
    started = time.monotonic()
    await asyncio.wait_for(gate.server.stop(grace=0.3), 5)
    assert str(await c.reply(timeout=2)) == SHUTDOWN
    assert await c.closed()
    assert time.monotonic() - started < 3


async def test_message_at_the_upstream_within_grace(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.delays["DOT"] = 0.5
    gate = await gate_factory()
    c = await in_transaction(gate)
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b".\r\n")
    await asyncio.sleep(0.1)
    stop = asyncio.create_task(gate.server.stop(grace=5))
    assert (await c.reply(timeout=3)).code == 250  # the upstream's answer, relayed
    assert str(await c.reply()) == SHUTDOWN
    await asyncio.wait_for(stop, 3)
    assert len(sink.messages) == 1


def test_sigterm_stops_a_running_spamgate(tmp_path: Path) -> None:
    """The real process: SIGTERM, 421 to an idle client, exit status 0."""
    port = free_port()
    config = tmp_path / "spamgate.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        "shutdown_grace = 5\n"
        f'[upstream]\naddress = "maildir:{tmp_path}/mail"\n'
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spamgate", "run", "-c", str(config)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        async def talk() -> str:
            deadline = time.monotonic() + 15
            while True:
                try:
                    c, banner = await RawClient.connect(port)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.05)
            assert banner is not None and banner.code == 220
            await c.cmd("EHLO c.test")
            proc.send_signal(signal.SIGTERM)
            reply = await c.reply(timeout=5)
            assert await c.closed()
            return str(reply)

        assert asyncio.run(talk()) == SHUTDOWN
        assert proc.wait(timeout=10) == 0
        assert b"shutting down: 1 sessions open" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
