"""Slow clients: the minimum data rate, and shorter timeouts under stress.

A client that sends a byte every few seconds satisfies every "time since the last
byte" timeout for ever. Two bounds stop it, as in Postfix: `min_data_rate` bounds
the whole of DATA (data_timeout plus one second per min_data_rate bytes), and
near `max_sessions` spamgate is under stress and every wait, including the ones
already in progress, is cut to the stress timeouts (Postfix's ${stress}).
bench/slowloris.py measures what this buys good clients with 2,000 tricklers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from spamgate import metrics
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory
from .test_limits import limits, start_txn, wait_sessions


def stress_gauge() -> float:
    return metrics.REGISTRY.get_sample_value("spamgate_stress") or 0.0


async def trickle(c: RawClient, data: bytes, every: float) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(data), 10):
            await c.send(data[i : i + 10])
            await asyncio.sleep(every)


async def test_min_data_rate_bounds_a_trickle(gate_factory: GateFactory, sink: Sink) -> None:
    """Never quiet for data_timeout, yet cut off: 50 bytes/s against a 100 bytes/s
    minimum gives up once 0.5 s + received/100 has passed, about 1 s in."""
    gate = await gate_factory(limits(data_timeout=0.5, min_data_rate=100, idle_timeout=30))
    c, _ = await gate.client()
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    started = time.monotonic()
    task = asyncio.create_task(trickle(c, b"Subject: slow\r\n\r\n" + b"x" * 500, every=0.2))
    r = await c.reply(timeout=10)
    elapsed = time.monotonic() - started
    task.cancel()
    assert str(r) == "421 4.4.2 gate.test Error: timeout exceeded"
    assert 0.9 < elapsed < 3.5  # the trickle alone would last 12 s
    assert await c.closed()
    assert sink.messages == [] and "DATA" not in sink.commands


async def test_min_data_rate_leaves_a_normal_sender_alone(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory(limits(data_timeout=0.5, min_data_rate=100))
    c, _ = await gate.client()
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    body = b"Subject: fast\r\n\r\n" + b"y" * 998 + b"\r\n"
    for _ in range(3):  # 3 KB in 0.6 s: 5 KB/s, and quiet for 0.3 s at most
        await c.send(body)
        await asyncio.sleep(0.2)
    await c.send(b".\r\n")
    assert (await c.reply()).code == 250
    assert len(sink.messages[0].original) == 3 * len(body)


STRESS = dict(
    max_sessions=4,
    stress_threshold=0.5,  # stress from 2 sessions on
    stress_idle_timeout=0.3,
    stress_data_timeout=0.3,
    idle_timeout=30,
    data_timeout=30,
    min_data_rate=0,
)


async def test_stress_cuts_waits_already_in_progress(gate_factory: GateFactory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="spamgate")
    gate = await gate_factory(limits(**STRESS))
    slow, _ = await gate.client(source="127.0.0.5")
    await slow.send(b"EHLO half-a-line")  # a slowloris, mid-command
    await asyncio.sleep(0.5)  # longer than the stress timeout, but no stress yet
    assert stress_gauge() == 0
    started = time.monotonic()
    await gate.client(source="127.0.0.6")  # the second session: stress
    r = await slow.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 0.25  # its 0.3 s were up already: at once
    assert "under stress: 2 sessions (max_sessions 4)" in caplog.text
    # with one session left, the stress is over
    await wait_sessions(gate, 1)
    assert stress_gauge() == 0
    assert "no longer under stress: 1 sessions" in caplog.text


async def test_stress_cuts_an_over_long_line(gate_factory: GateFactory) -> None:
    """A line beyond the read buffer is skipped under the stress timeout too."""
    gate = await gate_factory(limits(**STRESS))
    slow, _ = await gate.client(source="127.0.0.5")
    await slow.cmd("EHLO c.test")
    await slow.send(b"MAIL FROM:<" + b"A" * 70_000)  # ... and then silence
    await asyncio.sleep(0.5)
    assert stress_gauge() == 0
    started = time.monotonic()
    await gate.client(source="127.0.0.6")  # the second session: stress
    r = await slow.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 0.25


async def test_stress_shortens_the_wait_for_a_proxy_header(gate_factory: GateFactory) -> None:
    """A connection that owes a PROXY header is not a session yet, but it is a
    read of client bytes: under stress it waits no longer than the idle timeout."""
    gate = await gate_factory(
        limits(**STRESS) + '[[listener]]\naddress = "127.0.0.1:0"\nproxy_protocol = true\n',
        server={"proxy_protocol_timeout": "30"},
    )
    busy = [(await gate.client(source=f"127.0.0.{5 + i}"))[0] for i in range(2)]
    assert stress_gauge() == 1
    started = time.monotonic()
    c, _ = await gate.client(listener=1, greet=False)
    await c.send(b"PROXY TCP4 203.0.113.7")  # ... and then silence
    assert await asyncio.wait_for(c.reader.read(), 5) == b""
    assert time.monotonic() - started < 2
    for b in busy:
        await b.cmd("QUIT")


async def keep_busy(c: RawClient, stop: asyncio.Event) -> tuple[int, int]:
    """A prompt client: a command every 0.1 s; returns (answered 250, sent)."""
    ok = sent = 0
    while not stop.is_set():
        sent += 1
        ok += (await c.cmd("NOOP")).code == 250
        await asyncio.sleep(0.1)
    await c.cmd("QUIT")
    return ok, sent


async def test_new_sessions_under_stress_get_the_stress_timeout(gate_factory: GateFactory) -> None:
    gate = await gate_factory(limits(**STRESS))
    stop = asyncio.Event()
    busy = [(await gate.client(source=f"127.0.0.{5 + i}"))[0] for i in range(2)]
    tasks = [asyncio.create_task(keep_busy(c, stop)) for c in busy]
    await asyncio.sleep(0.1)
    assert stress_gauge() == 1
    started = time.monotonic()
    quiet, _ = await gate.client(source="127.0.0.7")
    r = await quiet.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert 0.25 < time.monotonic() - started < 1.5
    await asyncio.sleep(0.6)  # twice the stress timeout more, still under stress
    stop.set()
    # the prompt clients were never cut off: 0.1 s between commands is well within
    # the 0.3 s stress timeout, so every command they sent was answered 250
    for ok, sent in await asyncio.gather(*tasks):
        assert ok == sent and sent >= 3
    await wait_sessions(gate, 0)
    assert stress_gauge() == 0
    calm, _ = await gate.client(source="127.0.0.7")  # calm again: the usual timeout
    try:
        await calm.reply(timeout=0.8)
        raise AssertionError("timed out with the stress timeout while calm")
    except TimeoutError:
        pass
    assert (await calm.cmd("NOOP")).code == 250


async def test_stress_cuts_a_stalled_data_phase(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(**STRESS))
    c, _ = await gate.client(source="127.0.0.5")
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: stalled\r\n\r\nand then nothing")
    await asyncio.sleep(0.4)
    started = time.monotonic()
    # The second session brings stress and keeps it: a session that left at its own
    # 0.3 s stress timeout would end the stress in a race with the cut. The cut
    # comes at once when the reader saw the stall began before the stress, or one
    # stress timeout later when the content reached it after its wait began (it
    # sees only that data came since, not when).
    other, _ = await gate.client(source="127.0.0.6")
    stop = asyncio.Event()
    busy = asyncio.create_task(keep_busy(other, stop))
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 0.8
    stop.set()
    await busy
    assert sink.messages == [] and "DATA" not in sink.commands


async def test_good_client_is_unaffected_by_stress(gate_factory: GateFactory, sink: Sink) -> None:
    """A client that sends its commands promptly gets its mail through under stress."""
    gate = await gate_factory(limits(**STRESS))
    idle, _ = await gate.client(source="127.0.0.5")
    c, _ = await gate.client(source="127.0.0.6")
    assert stress_gauge() == 1
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: prompt\r\n\r\nbody\r\n.\r\n")
    assert (await c.reply()).code == 250
    assert len(sink.messages) == 1
    assert (await idle.reply(timeout=5)).code == 421
