"""The asyncio milter server over a real socket, driven by a hand-written MTA side."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from spamgate.milter.codec import AddHeader, Continue, ReplyCode, TempFail
from spamgate.milter.handler import MessageDecision
from spamgate.milter.server import Limits
from tests.kit.milterkit import (
    MtaClient,
    Recorder,
    connect,
    cstrings,
    macros,
    mta_packet,
    optneg,
    running_milter,
)


async def negotiated(address: tuple[str, int]) -> MtaClient:
    mta = await MtaClient.connect(address)
    await mta.send(optneg())
    code, data = await mta.response()
    assert code == b"O"
    version, actions, protocol = struct.unpack("!III", data[:12])
    assert (version, actions, protocol) == (6, 0x131, 0x100100)
    return mta


async def test_one_connection_many_messages() -> None:
    def script(name: str, arg: object):
        if name == "rcpt" and arg.address == "no@example.test":
            return ReplyCode(550, "5.7.1", ("not this one",))
        if name == "eom":
            return MessageDecision(Continue(), (AddHeader("X-Seen", "yes"),))
        return None

    recorder = Recorder(script)
    async with running_milter(recorder) as server:
        mta = await negotiated(server.addresses[0])
        await mta.send(macros(b"C", j="mx.test") + connect())
        assert await mta.response() == (b"c", b"")
        for n in range(3):
            await mta.send(mta_packet(b"M", cstrings(f"<s{n}@example.org>")))
            assert await mta.response() == (b"c", b"")
            await mta.send(mta_packet(b"R", cstrings("<no@example.test>")))
            code, data = await mta.response()
            assert (code, data) == (b"y", b"550 5.7.1 not this one\0")
            await mta.send(mta_packet(b"R", cstrings("<u@example.test>")))
            assert await mta.response() == (b"c", b"")
            for packet in (
                mta_packet(b"T"),
                mta_packet(b"L", cstrings("Subject", " x")),
                mta_packet(b"N"),
                mta_packet(b"B", b"body\r\n"),
            ):
                await mta.send(packet)
                assert (await mta.response())[0] == b"c"
            await mta.send(mta_packet(b"E"))
            assert await mta.response() == (b"h", b"X-Seen\0 yes\0")
            assert await mta.response() == (b"c", b"")
            await mta.send(mta_packet(b"A"))
        await mta.send(mta_packet(b"Q"))
        assert await mta.closed()
        (session,) = await recorder.closed_sessions(1)
        assert session.names().count("eom") == 3 and session.names().count("abort") == 3
        assert session.macros_at("connect") == [{"j": "mx.test"}]


async def test_quit_new_connection_gets_a_new_handler() -> None:
    recorder = Recorder()
    async with running_milter(recorder) as server:
        mta = await negotiated(server.addresses[0])
        await mta.send(connect(addr="127.0.0.11"))
        await mta.response()
        await mta.send(mta_packet(b"K") + connect(addr="127.0.0.12"))
        await mta.response()
        await mta.send(mta_packet(b"Q"))
        first, second = await recorder.closed_sessions(2)
        assert first.args("connect")[0].address == "127.0.0.11"
        assert second.args("connect")[0].address == "127.0.0.12"


async def test_deadline_and_failure_get_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    def script(name: str, arg: object):
        if name == "helo":
            raise RuntimeError("check blew up")
        return None

    recorder = Recorder(script, delay=0.0)
    limits = Limits(command_deadline=0.2)
    async with running_milter(recorder, limits=limits) as server:
        mta = await negotiated(server.addresses[0])
        await mta.send(connect())
        assert await mta.response() == (b"c", b"")
        with caplog.at_level(logging.ERROR, "spamgate.milter"):
            await mta.send(mta_packet(b"H", cstrings("x")))
            assert await mta.response() == (b"t", b"")
        assert "check blew up" in caplog.text
        recorder.sessions[0].delay = 1.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        await mta.send(mta_packet(b"M", cstrings("<a@b.test>")))
        assert await mta.response() == (b"t", b"")
        assert loop.time() - started < 0.9


async def test_refused_decision_gets_the_fallback() -> None:
    from spamgate.milter.codec import Discard

    recorder = Recorder(lambda name, arg: Discard() if name == "connect" else None)
    async with running_milter(recorder, limits=Limits(fallback=TempFail())) as server:
        mta = await negotiated(server.addresses[0])
        await mta.send(connect())
        assert await mta.response() == (b"t", b"")


@pytest.mark.parametrize(
    "bad",
    [
        b"\0\0\0\0",
        b"\x7f\xff\xff\xffB",
        mta_packet(b"Z"),
        mta_packet(b"H", b"unterminated"),
        mta_packet(b"Q") + b"trailing",
    ],
)
async def test_bad_input_closes_cleanly(bad: bytes, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    async with running_milter(recorder) as server:
        mta = await negotiated(server.addresses[0])
        await mta.send(connect())
        await mta.response()
        with caplog.at_level(logging.INFO, "spamgate.milter"):
            await mta.send(bad)
            assert await mta.closed()
            await recorder.closed_sessions(1)
        if bad != mta_packet(b"Q") + b"trailing":
            assert "protocol violation" in caplog.text
        # the server still serves the next connection
        again = await negotiated(server.addresses[0])
        await again.close()


async def test_idle_and_packet_deadlines() -> None:
    recorder = Recorder()
    limits = Limits(idle_timeout=0.3, packet_timeout=0.2)
    async with running_milter(recorder, limits=limits) as server:
        mta = await negotiated(server.addresses[0])
        assert await mta.closed(timeout=2)  # idle: nothing after the negotiation
        mta = await negotiated(server.addresses[0])
        await mta.send(connect()[:6])  # a packet begun and never finished
        assert await mta.closed(timeout=2)


async def test_missing_macros_are_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    async with running_milter(recorder) as server:
        with caplog.at_level(logging.WARNING, "spamgate.milter"):
            for _ in range(2):
                mta = await negotiated(server.addresses[0])
                await mta.send(macros(b"C", j="mx.test", client_addr="127.0.0.9") + connect())
                assert await mta.response() == (b"c", b"")
                await mta.send(mta_packet(b"Q"))
                assert await mta.closed()
    warnings = [r.getMessage() for r in caplog.records if "sent no" in r.getMessage()]
    assert warnings == [
        "milter: Postfix sent no {client_name} {client_port} {client_ptr} {daemon_name} "
        "at connect; its milter macro lists lack what spamgate reads (docs/milter.md)"
    ]
