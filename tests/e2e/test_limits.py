"""Every configurable limit of the core, over real sockets, with small values.

Each limit is tried at the boundary (the largest value allowed passes, one more is
refused with the documented reply), and the session or server is shown to carry
on correctly afterwards: no desynchronised stream, nothing sent upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from spamgate import metrics
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import Gate, GateFactory


def count(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def limits(**values: object) -> str:
    return "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


async def start_txn(c: RawClient, rcpts: int = 1) -> None:
    assert (await c.cmd("EHLO c.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    for i in range(rcpts):
        assert (await c.cmd(f"RCPT TO:<u{i}@example.test>")).code == 250


async def send_message(c: RawClient, content: bytes):
    """DATA, the content, the dot; the reply to the dot."""
    assert (await c.cmd("DATA")).code == 354
    await c.send(content + b".\r\n")
    return await c.reply()


def data_commands(sink: Sink) -> int:
    return sink.commands.count("DATA")


async def wait_sessions(gate: Gate, n: int) -> None:
    """Until the server has counted the closed sessions out (it does so async)."""
    async with asyncio.timeout(5):
        while gate.server.runtime.active != n:
            await asyncio.sleep(0.01)


# -- message size -------------------------------------------------------------------


async def test_declared_size_over_the_limit(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(message_size=1000))
    c, _ = await gate.client()
    ehlo = await c.cmd("EHLO c.test")
    assert "SIZE 1000" in ehlo.lines
    r = await c.cmd("MAIL FROM:<a@example.org> SIZE=1001")
    assert (r.code, r.enhanced) == (552, "5.3.4")
    assert sink.connections == 0  # refused before any upstream session
    assert (await c.cmd("MAIL FROM:<a@example.org> SIZE=1000")).code == 250


async def test_actual_size_at_and_over_the_limit(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(message_size=1000))
    head = b"Subject: size\r\n\r\n"
    exactly = head + b"a" * (1000 - len(head) - 2) + b"\r\n"
    assert len(exactly) == 1000
    c, _ = await gate.client()
    await start_txn(c)
    r = await send_message(c, exactly[:-2] + b"b\r\n")  # one byte too many
    assert (r.code, r.enhanced) == (552, "5.3.4")
    assert sink.messages == [] and data_commands(sink) == 0  # the upstream never saw DATA
    assert sink.commands[-1] == "RSET"
    # the whole oversized message was read: the session is in step
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    r = await send_message(c, exactly)
    assert r.code == 250
    assert [m.original for m in sink.messages] == [exactly]


async def test_size_counts_the_wire_bytes_of_a_large_message(
    gate_factory: GateFactory, sink: Sink
) -> None:
    # Much larger than the reader's 64 KiB buffer: the size is counted across reads.
    gate = await gate_factory(limits(message_size=300_000))
    line = b"x" * 98 + b"\r\n"
    c, _ = await gate.client()
    await start_txn(c)
    r = await send_message(c, line * 3001)  # 300,100 bytes
    assert (r.code, r.enhanced) == (552, "5.3.4")
    await c.cmd("RSET")
    await start_txn(c)
    r = await send_message(c, line * 3000)
    assert r.code == 250
    # No header field: the content goes on after an empty line, as Postfix delivers it.
    assert sink.messages[0].original == b"\r\n" + line * 3000


# -- recipients ------------------------------------------------------------------------


async def test_recipients_per_message(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(recipients=3))
    c, _ = await gate.client(source="127.0.0.5")  # not in mynetworks
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    # refused recipients do not count towards the limit
    assert (await c.cmd("RCPT TO:<x@elsewhere.test>")).code == 554
    codes = [(await c.cmd(f"RCPT TO:<u{i}@example.test>")).code for i in range(3)]
    assert codes == [250, 250, 250]
    r = await c.cmd("RCPT TO:<u3@example.test>")
    assert (r.code, r.enhanced, r.text) == (452, "4.5.3", "4.5.3 Error: too many recipients")
    assert (await send_message(c, b"Subject: r\r\n\r\nx\r\n")).code == 250
    assert sink.messages[0].rcpt_tos == ["u0@example.test", "u1@example.test", "u2@example.test"]
    assert not any("u3@" in cmd for cmd in sink.commands)
    # the limit is per message
    await c.cmd("MAIL FROM:<a@example.org>")
    codes = [(await c.cmd(f"RCPT TO:<v{i}@example.test>")).code for i in range(4)]
    assert codes == [250, 250, 250, 452]


# -- line lengths ---------------------------------------------------------------------


async def test_command_line_length(gate_factory: GateFactory) -> None:
    gate = await gate_factory(limits(command_line_length=64))
    c, _ = await gate.client()
    fits = b"NOOP " + b"x" * (64 - 7) + b"\r\n"
    assert len(fits) == 64
    await c.send(fits)
    assert (await c.reply()).code == 250
    await c.send(fits[:-2] + b"y\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (500, "5.5.2")
    assert (await c.cmd("EHLO c.test")).code == 250


async def test_command_line_beyond_the_read_buffer(gate_factory: GateFactory, sink: Sink) -> None:
    """A line longer than the stream buffer is skipped whole, not read as commands."""
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    # The tail of the long line looks like a command; it must not run as one.
    await c.send(b"NOOP " + b"A" * 200_000 + b" MAIL FROM:<evil@example.org>\r\nRSET\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced, r.text) == (500, "5.5.2", "5.5.2 Error: command line too long")
    assert (await c.reply()).code == 250  # RSET, the next real command
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503  # no MAIL was run
    assert sink.connections == 0


# A command line that never ends: more than the 64 KiB read buffer, then silence.
ENDLESS = b"MAIL FROM:<" + b"A" * 70_000


async def test_idle_timeout_covers_a_line_beyond_the_read_buffer(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """Skipping an over-long line is reading it: under the same deadline."""
    gate = await gate_factory(limits(idle_timeout=0.5))
    c, _ = await gate.client()
    assert (await c.cmd("EHLO c.test")).code == 250
    started = time.monotonic()
    await c.send(ENDLESS)  # ... and then silence
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 2
    assert await c.closed()
    # a trickle of an over-long line does not keep it alive either
    c, _ = await gate.client()
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            await c.send(ENDLESS)
            for _ in range(40):
                await c.send(b"A" * 100)
                await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    r = await c.reply(timeout=5)
    task.cancel()
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 1.5  # the trickle would last 2 s
    assert sink.connections == 0


async def test_over_long_lines_cannot_hold_every_session(gate_factory: GateFactory) -> None:
    """max_sessions clients that each send an endless line are cut at the idle
    timeout, and a new client gets in (before the fix, 20 of them locked out all others)."""
    gate = await gate_factory(limits(max_sessions=3, idle_timeout=0.5, stress_threshold=0))
    holders = [(await gate.client(source=f"127.0.0.{5 + i}"))[0] for i in range(3)]
    for c in holders:
        await c.send(ENDLESS)
    _, banner = await gate.client(source="127.0.0.9")
    assert banner is not None and banner.code == 421  # full, for now
    for c in holders:
        assert (await c.reply(timeout=5)).code == 421
    await wait_sessions(gate, 0)
    _, banner = await gate.client(source="127.0.0.9")
    assert banner is not None and banner.code == 220


async def test_disconnect_while_an_over_long_line_is_skipped(
    gate_factory: GateFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spamgate")
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.send(ENDLESS)
    await asyncio.sleep(0.2)  # the skip is under way
    await c.close()
    await wait_sessions(gate, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert "disconnected" in caplog.text


async def test_text_line_length(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(text_line_length=100))
    fits = b"y" * 98 + b"\r\n"  # 100 bytes with its CRLF
    c, _ = await gate.client()
    await start_txn(c)
    r = await send_message(c, b"Subject: lines\r\n\r\n" + b"z" + fits)
    assert (r.code, r.enhanced) == (500, "5.5.2")
    assert "line too long" in r.text
    assert sink.messages == [] and data_commands(sink) == 0
    await start_txn(c)
    r = await send_message(c, b"Subject: lines\r\n\r\n" + fits)
    assert r.code == 250
    assert sink.messages[0].content.endswith(fits)


async def test_text_line_length_across_reads(gate_factory: GateFactory, sink: Sink) -> None:
    """An over-long line split over many TCP writes and buffer refills is still seen."""
    gate = await gate_factory(limits(text_line_length=1000, message_size=1_000_000))
    c, _ = await gate.client()
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: long\r\n\r\n")
    for _ in range(20):  # 100,000 bytes in one line, in 20 writes
        await c.send(b"w" * 5000)
        await asyncio.sleep(0.005)
    await c.send(b"\r\n.\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (500, "5.5.2")
    assert sink.messages == []


# -- timeouts ---------------------------------------------------------------------------


async def test_idle_timeout(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(idle_timeout=0.3))
    c, _ = await gate.client()
    await start_txn(c)
    started = time.monotonic()
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert r.text == "4.4.2 gate.test Error: timeout exceeded"
    assert 0.25 < time.monotonic() - started < 3
    assert await c.closed()
    assert sink.messages == [] and data_commands(sink) == 0


async def test_idle_timeout_counts_from_each_command(gate_factory: GateFactory) -> None:
    """Commands that keep coming keep the session; silence after them ends it."""
    gate = await gate_factory(limits(idle_timeout=0.5))
    c, _ = await gate.client()
    started = time.monotonic()
    for _ in range(6):  # 1.8 s in all, each gap well within the timeout
        assert (await c.cmd("NOOP")).code == 250
        await asyncio.sleep(0.3)
    assert time.monotonic() - started > 1.5
    quiet = time.monotonic()
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert 0.15 < time.monotonic() - quiet < 1.2  # 0.5 s after the last NOOP
    assert await c.closed()


async def test_idle_timeout_is_for_a_whole_line(gate_factory: GateFactory) -> None:
    """A client trickling a command byte by byte does not keep the session alive."""
    gate = await gate_factory(limits(idle_timeout=0.4))
    c, _ = await gate.client()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b"NOOP " * 10:
                await c.send(bytes([byte]))
                await asyncio.sleep(0.05)

    started = time.monotonic()
    task = asyncio.create_task(trickle())
    r = await c.reply(timeout=5)
    task.cancel()
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 1.5  # the trickle would last 2.5 s


async def test_data_timeout(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(limits(data_timeout=0.3, idle_timeout=30))
    c, _ = await gate.client()
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: stalled\r\n\r\nthe rest never comes\r\n")
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert await c.closed()
    assert sink.messages == [] and data_commands(sink) == 0


async def test_data_timeout_is_per_read_not_per_message(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """RFC 5321 §4.5.3.2.5 times each data block: a slow but steady sender that
    never pauses for data_timeout must not be cut off by data_timeout alone
    (min_data_rate, the bound on the whole message, is off here)."""
    gate = await gate_factory(limits(data_timeout=0.5, min_data_rate=0))
    c, _ = await gate.client()
    await start_txn(c)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: slow\r\n\r\n")
    for i in range(12):  # 1.2 s in all, never more than 0.1 s without data
        await c.send(b"line %d\r\n" % i)
        await asyncio.sleep(0.1)
    await c.send(b".\r\n")
    r = await c.reply(timeout=5)
    assert r.code == 250
    assert sink.messages[0].content.endswith(b"line 11\r\n")


# -- the error budget -------------------------------------------------------------------


async def test_too_many_errors(gate_factory: GateFactory) -> None:
    gate = await gate_factory(limits(errors=3))
    before = count("spamgate_protocol_errors_total", kind="too_many_errors")
    c, _ = await gate.client()
    assert (await c.cmd("FOO")).code == 502
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503  # no HELO yet
    assert (await c.cmd("BAR")).code == 502  # the third error...
    r = await c.reply()  # ...is followed by the 421
    assert (r.code, r.enhanced) == (421, "4.7.0")
    assert "too many errors" in r.text
    assert await c.closed()
    assert count("spamgate_protocol_errors_total", kind="too_many_errors") == before + 1


async def test_delivering_mail_resets_the_error_count(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory(limits(errors=3))
    c, _ = await gate.client()
    assert (await c.cmd("FOO")).code == 502
    assert (await c.cmd("FOO")).code == 502
    await start_txn(c)
    assert (await send_message(c, b"Subject: e\r\n\r\nx\r\n")).code == 250
    assert (await c.cmd("FOO")).code == 502
    assert (await c.cmd("FOO")).code == 502
    assert (await c.cmd("NOOP")).code == 250  # still open: 2 errors since the message


# -- concurrency ------------------------------------------------------------------------


async def test_max_sessions(gate_factory: GateFactory) -> None:
    gate = await gate_factory(limits(max_sessions=2))
    before = count("spamgate_sessions_refused_total", reason="max_sessions")
    a, _ = await gate.client(source="127.0.0.5")
    b, _ = await gate.client(source="127.0.0.6")
    c, banner = await gate.client(source="127.0.0.7")
    assert banner is not None
    assert (banner.code, banner.enhanced) == (421, "4.7.0")
    assert banner.text == "4.7.0 gate.test Error: too many connections"
    assert await c.closed()
    assert count("spamgate_sessions_refused_total", reason="max_sessions") == before + 1
    assert (await a.cmd("NOOP")).code == 250  # the admitted ones are unaffected
    await a.cmd("QUIT")
    await wait_sessions(gate, 1)
    d, banner = await gate.client(source="127.0.0.7")
    assert banner is not None and banner.code == 220
    assert (await b.cmd("NOOP")).code == 250 and (await d.cmd("NOOP")).code == 250


async def test_sessions_per_client(gate_factory: GateFactory) -> None:
    gate = await gate_factory(limits(sessions_per_client=2))
    first = [await gate.client(source="127.0.0.5") for _ in range(2)]
    assert [banner.code for _, banner in first] == [220, 220]
    c, banner = await gate.client(source="127.0.0.5")
    assert banner is not None
    assert str(banner) == "421 4.7.0 gate.test Error: too many connections from 127.0.0.5"
    assert await c.closed()
    _other, banner = await gate.client(source="127.0.0.6")  # another address is fine
    assert banner is not None and banner.code == 220
    await first[0][0].cmd("QUIT")
    await wait_sessions(gate, 2)
    _again, banner = await gate.client(source="127.0.0.5")
    assert banner is not None and banner.code == 220


# -- pregreet ------------------------------------------------------------------------------


def pregreet_config(action: str) -> str:
    return f'[smtp]\npregreet_wait = 0.3\npregreet_action = "{action}"\n'


async def talk_first(gate: Gate) -> RawClient:
    c, _ = await RawClient.connect(gate.port, gate.host, source="127.0.0.5", greet=False)
    await c.send(b"EHLO early.test\r\n")
    return c


async def test_pregreet_ignore_is_recorded(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    gate = await gate_factory(pregreet_config("ignore"))
    before = count("spamgate_protocol_errors_total", kind="pregreet")
    caplog.set_level(logging.INFO, logger="spamgate.session")
    c = await talk_first(gate)
    assert (await c.reply()).code == 220
    assert (await c.reply()).code == 250  # the early EHLO, answered in turn
    assert count("spamgate_protocol_errors_total", kind="pregreet") == before + 1
    assert "pregreet: client talked before the greeting (action=ignore)" in caplog.text
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await send_message(c, b"Subject: p\r\n\r\nx\r\n")).code == 250


async def test_pregreet_drop(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(pregreet_config("drop"))
    c = await talk_first(gate)
    r = await c.reply()
    assert (r.code, r.enhanced) == (521, "5.5.1")  # no 220 at all
    assert await c.closed()
    assert sink.connections == 0


async def test_pregreet_enforce_rejects_at_rcpt(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(pregreet_config("enforce"))
    c = await talk_first(gate)
    assert (await c.reply()).code == 220
    assert (await c.reply()).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.enhanced) == (550, "5.5.1")
    assert "talked before greeting" in r.text
    assert (await c.cmd("DATA")).code == 554
    assert sink.connections == 0  # the upstream never heard of this client


async def test_polite_client_is_not_a_pregreeter(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(pregreet_config("drop"))
    before = count("spamgate_protocol_errors_total", kind="pregreet")
    c, banner = await gate.client()
    assert banner is not None and banner.code == 220
    await start_txn(c)
    assert (await send_message(c, b"Subject: p\r\n\r\nx\r\n")).code == 250
    assert count("spamgate_protocol_errors_total", kind="pregreet") == before
