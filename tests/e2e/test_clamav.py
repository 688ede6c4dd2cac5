"""Antivirus through a real clamd (Debian's clamav-daemon), private, on loopback."""

from __future__ import annotations

import logging
import time

import pytest

from tests.kit.daemons import SIGNATURE, SIGNATURE_NAME, Clamd
from tests.kit.mimemaker import header, plain, with_attachment
from tests.kit.ports import free_port
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample


def infected(subject: str = "virus") -> bytes:
    """The test signature inside a base64 attachment: clamd decodes MIME to find it."""
    return with_attachment("report.doc", f"data {SIGNATURE} data".encode(), subject=subject)


@pytest.mark.parametrize("how", ["tcp", "unix"])
async def test_signature_refused_clean_accepted(
    gate_factory: GateFactory, clamd: Clamd, sink: Sink, how: str
) -> None:
    address = clamd.address if how == "tcp" else clamd.unix
    gate = await gate_factory(f'[clamav]\naddress = "{address}"\n')
    found = sample("spamgate_content_scans_total", check="clamav", result="infected")
    replies = await gate.send(infected())
    assert replies[-1].code == 554
    assert replies[-1].text == f"5.7.0 Virus found: {SIGNATURE_NAME}"
    assert sample("spamgate_content_scans_total", check="clamav", result="infected") == found + 1
    replies = await gate.send(plain("nothing to see here"))
    assert replies[-1].code == 250
    assert len(sink.messages) == 1


async def test_hold_and_score(gate_factory: GateFactory, clamd: Clamd, sink: Sink) -> None:
    gate = await gate_factory(f'[clamav]\naddress = "{clamd.address}"\naction = "hold"\n')
    assert (await gate.send(infected()))[-1].code == 250
    assert sink.messages == []  # quarantined
    gate = await gate_factory(
        f'[clamav]\naddress = "{clamd.address}"\naction = "score"\nscore = 3\n[scoring]\ntag = 1\n'
    )
    assert (await gate.send(infected("scored")))[-1].code == 250
    assert b"X-Spam-Symbols: CLAMAV_VIRUS" in sink.messages[0].content


async def test_clamd_stopped_fail_open_then_back(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A clamd of the test's own, stopped in the middle: on_error = continue."""
    own = Clamd().start()
    try:
        gate = await gate_factory(f'[clamav]\naddress = "{own.address}"\ntimeout = 5\n')
        assert (await gate.send(infected("before")))[-1].code == 554
        own.stop()
        outages = sample("spamgate_backend_outages_total", check="clamav")
        errors = sample("spamgate_check_errors_total", check="clamav", kind="exception")
        caplog.set_level(logging.DEBUG)
        for n in range(3):
            replies = await gate.send(infected(f"down {n}"))
            assert replies[-1].code == 250  # fail-open: delivered unscanned
        assert len(sink.messages) == 3
        # counted once per outage, each message as a check error; logged loudly once
        assert sample("spamgate_backend_outages_total", check="clamav") == outages + 1
        assert sample("spamgate_check_errors_total", check="clamav", kind="exception") == errors + 3
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "clamd" in r.message]
        assert len(loud) == 1, [r.message for r in loud]
        own.start()
        assert (await gate.send(infected("after")))[-1].code == 554
        assert any("answers again" in r.message for r in caplog.records)
    finally:
        own.cleanup()


async def test_clamd_down_tempfail(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(
        f'[clamav]\naddress = "127.0.0.1:{free_port()}"\non_error = "tempfail"\n'
    )
    replies = await gate.send(infected())
    assert replies[-1].code == 451
    assert replies[-1].text.startswith("4.3.0")
    assert sink.messages == []


async def test_slow_clamd_bounded_by_timeout(gate_factory: GateFactory, sink: Sink) -> None:
    """A "clamd" that accepts and never answers: the timeout, not a hang."""
    import asyncio

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gate = await gate_factory(f'[clamav]\naddress = "127.0.0.1:{port}"\ntimeout = 0.5\n')
        before = sample("spamgate_check_errors_total", check="clamav", kind="timeout")
        started = time.monotonic()
        replies = await gate.send(infected())
        assert replies[-1].code == 250
        assert time.monotonic() - started < 3
        assert sample("spamgate_check_errors_total", check="clamav", kind="timeout") == before + 1
    finally:
        server.close()


async def test_larger_than_max_size_scanned_in_part(
    gate_factory: GateFactory, clamd: Clamd, sink: Sink
) -> None:
    """Never more than max_size is streamed (clamd's StreamMaxLength would refuse it)."""
    gate = await gate_factory(
        f'[clamav]\naddress = "{clamd.address}"\nmax_size = 100000\n'
        "[limits]\nmessage_size = 30000000\n"
    )
    partial = sample("spamgate_content_scans_total", check="clamav", result="partial")
    early = header("early") + b"Content-Type: text/plain\r\n\r\n" + SIGNATURE.encode() + b"\r\n"
    replies = await gate.send(early + (b"y" * 78 + b"\r\n") * 250_000)
    assert replies[-1].code == 554  # found in the first 100 KB of a 20 MB message
    late = plain("clean start") + (b"y" * 78 + b"\r\n") * 2000 + SIGNATURE.encode() + b"\r\n"
    replies = await gate.send(late)
    assert replies[-1].code == 250  # past max_size: not seen, and counted as partial
    assert sample("spamgate_content_scans_total", check="clamav", result="partial") == partial + 1
