"""The milter front end over a real socket, fed by the hand-written MTA side of
tests/kit/milterkit.py: what a test Postfix cannot easily be made to send (AUTH and
TLS macros, a client without an IP address, a header Postfix folded, a message
over spamgate's own size limit) and the exact answers spamgate gives."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from spamgate import metrics
from spamgate.app import build, loads
from spamgate.milter.frontend import MilterGate, field_value, reply_code
from spamgate.milter.server import MilterServer
from spamgate.ops.server import UNIX_NEEDS
from spamgate.reply import Reply
from tests.kit.dnsserver import DnsServer
from tests.kit.milterkit import MtaClient, connect, cstrings, macros, mta_packet, optneg

from ..conftest import config_text
from .scripted import SIGNER


def packet_text(data: bytes) -> str:
    return data.rstrip(b"\0").decode()


class Mta:
    """One MTA connection to spamgate's milter: each event, its answer(s)."""

    def __init__(self, client: MtaClient) -> None:
        self.client = client

    async def event(self, *packets: bytes) -> tuple[bytes, bytes]:
        await self.client.send(*packets)
        return await self.client.response()

    async def end_of_message(self) -> list[tuple[bytes, bytes]]:
        """The edits and the final answer to SMFIC_BODYEOB."""
        await self.client.send(macros(b"E", i="QID1") + mta_packet(b"E"))
        answers = []
        while True:
            answer = await self.client.response()
            answers.append(answer)
            if answer[0] not in b"himq":
                return answers

    async def message(self, content: bytes, chunk: int = 65535) -> list[tuple[bytes, bytes]]:
        """DATA, the header fields as Postfix sends them (with SMFIP_HDR_LEADSPC:
        everything after the colon, folds as LF), the body in chunks, the end."""
        assert await self.event(macros(b"T", i="QID1") + mta_packet(b"T")) == (b"c", b"")
        head, body = content.split(b"\r\n\r\n", 1)
        fields: list[bytes] = []
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                fields[-1] += b"\n" + line
            else:
                fields.append(line)
        for field in fields:
            name, value = field.split(b":", 1)
            answer = await self.event(mta_packet(b"L", name + b"\0" + value + b"\0"))
            if answer != (b"c", b""):
                return [answer]
        assert await self.event(mta_packet(b"N")) == (b"c", b"")
        for i in range(0, len(body), chunk):
            answer = await self.event(mta_packet(b"B", body[i : i + chunk]))
            if answer != (b"c", b""):
                return [answer]
        return await self.end_of_message()


@pytest.fixture
async def milter(dns_server: DnsServer, tmp_path) -> AsyncIterator:
    servers: list[MilterServer] = []
    apps = []

    async def start(extra: str = "") -> tuple[str, int]:
        text = config_text(None, extra, server={"listen": "[]"}, dns=dns_server)
        text += '\n[milter]\nlisten = ["inet:127.0.0.1:0"]\n'
        app = build(loads(text, str(tmp_path / "spamgate.toml")))
        server = MilterServer(MilterGate(app))
        servers.append(server)
        apps.append(app)
        return await server.listen_tcp()

    async def session(address: tuple[str, int], client: str = "127.0.0.40", **more) -> Mta:
        mta = MtaClient(*await _open(address))
        await mta.send(optneg())
        code, data = await mta.response()
        assert code == b"O" and struct.unpack("!I", data[:4])[0] == 6
        m = Mta(mta)
        answer = await m.event(
            macros(
                b"C",
                j="mx.example.test",
                daemon_name="mx.example.test",
                client_addr=client,
                client_port="40000",
                client_name="unknown",
                client_ptr="unknown",
            )
            + connect("[" + client + "]", client, 40000),
        )
        assert answer == (b"c", b""), answer
        tls = {k: v for k, v in more.items() if k in ("tls_version", "cipher", "cipher_bits")}
        assert await m.event(
            macros(b"H", **tls) + mta_packet(b"H", cstrings("c.example.test"))
        ) == (
            b"c",
            b"",
        )
        return m

    start.session = session  # type: ignore[attr-defined]
    yield start
    for server in servers:
        await server.close(grace=0.2)
    for app in apps:
        await app.aclose()


async def _open(address: tuple[str, int]):
    return await asyncio.open_connection(*address)


def mail(sender: str, *params: str, **macro_values: str) -> bytes:
    return macros(b"M", **macro_values) + mta_packet(b"M", cstrings(f"<{sender}>", *params))


def rcpt(recipient: str) -> bytes:
    return mta_packet(b"R", cstrings(f"<{recipient}>"))


BODY = b"From: a@example.org\r\nTo: u@example.test\r\nSubject: hi\r\n\r\nHello\r\n"


async def test_authenticated_clients_relay_as_through_the_proxy(milter) -> None:
    """Postfix says who logged in ({auth_authen} at MAIL): relay control lets that
    client send anywhere, as after AUTH through the proxy."""
    address = await milter()
    anonymous = await milter.session(address)
    assert await anonymous.event(mail("a@example.org")) == (b"c", b"")
    code, data = await anonymous.event(rcpt("x@elsewhere.test"))
    assert code == b"y" and packet_text(data).startswith("554 5.7.1 ")
    user = await milter.session(address)
    assert await user.event(mail("a@example.org", auth_authen="alice")) == (b"c", b"")
    assert await user.event(rcpt("x@elsewhere.test")) == (b"c", b"")


async def test_tls_macros_reach_the_checks_but_add_no_received(milter) -> None:
    address = await milter()
    before = metrics.STARTTLS.labels("TLSv1.3")._value.get()
    m = await milter.session(address, tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")
    assert await m.event(mail("a@example.org")) == (b"c", b"")
    assert await m.event(rcpt("u@example.test")) == (b"c", b"")
    answers = await m.message(BODY)
    names = [packet_text(d[4:]).split("\0")[0] for c, d in answers if c == b"i"]
    assert names == ["Authentication-Results"]  # no Received of ours: Postfix wrote one
    assert answers[-1] == (b"c", b"")
    assert metrics.STARTTLS.labels("TLSv1.3")._value.get() == before + 1


async def test_folded_and_8bit_headers_are_rebuilt_as_postfix_queues_them(
    milter, dns_server: DnsServer
) -> None:
    """DKIM verifies over the header fields as rebuilt from the milter events: a
    folded field, a field without a space after the colon, raw UTF-8."""
    dns_server.zone("spf-pass.test", {SIGNER.name: {"TXT": SIGNER.record}})
    address = await milter("[dkim]\nenabled = true\n")
    content = SIGNER.sign(
        "From: a@spf-pass.test\r\nTo: u@example.test\r\n"
        "Subject: a folded\r\n\tsubject with \u00e9t\u00e9\r\nX-Tight:no-space\r\n"
        "\r\nHello\r\n".encode()
    )
    m = await milter.session(address)
    assert await m.event(mail("a@spf-pass.test")) == (b"c", b"")
    assert await m.event(rcpt("u@example.test")) == (b"c", b"")
    answers = await m.message(content)
    (ar,) = [packet_text(d[4:]) for c, d in answers if c == b"i"]
    assert "dkim=pass" in ar, ar


async def test_message_over_the_size_limit_is_refused_mid_body(milter) -> None:
    address = await milter("[limits]\nmessage_size = 100000\n")
    before = metrics.PROTOCOL_ERRORS.labels("message_too_big")._value.get()
    m = await milter.session(address)
    assert await m.event(mail("a@example.org")) == (b"c", b"")
    assert await m.event(rcpt("u@example.test")) == (b"c", b"")
    answers = await m.message(BODY + b"x" * 998 + b"\r\n" * 200 + b"y" * 200000)
    ((code, data),) = answers
    assert code == b"y" and packet_text(data).startswith("552 5.3.4 "), data
    assert metrics.PROTOCOL_ERRORS.labels("message_too_big")._value.get() == before + 1
    # the session goes on: a second, small message passes
    await m.client.send(mta_packet(b"A"))
    assert await m.event(mail("a@example.org")) == (b"c", b"")
    assert await m.event(rcpt("u@example.test")) == (b"c", b"")
    assert (await m.message(BODY))[-1] == (b"c", b"")


async def test_a_client_without_an_ip_address_is_accepted_unchecked(milter) -> None:
    address = await milter()
    mta = MtaClient(*await _open(address))
    await mta.send(optneg())
    assert (await mta.response())[0] == b"O"
    local = mta_packet(b"C", cstrings("localhost") + b"L" + struct.pack("!H", 0) + cstrings("/x"))
    await mta.send(local)
    assert await mta.response() == (b"a", b"")


async def test_over_max_sessions_postfix_is_told_to_try_later(milter) -> None:
    address = await milter("[limits]\nmax_sessions = 1\n")
    before = metrics.SESSIONS_REFUSED.labels("max_sessions")._value.get()
    first = await milter.session(address)
    mta = MtaClient(*await _open(address))
    await mta.send(optneg())
    await mta.response()
    await mta.send(connect("[127.0.0.41]", "127.0.0.41"))
    assert await mta.response() == (b"t", b"")
    assert metrics.SESSIONS_REFUSED.labels("max_sessions")._value.get() == before + 1
    await first.client.send(mta_packet(b"Q"))
    assert await first.client.closed()


def test_reply_codes_fit_the_protocol() -> None:
    long = Reply(550, None, ("x%" * 400, "second line"))
    rc = reply_code(long)
    assert rc.enhanced == "5.7.1" and len(rc.lines) == 2
    assert all(len(line) <= 512 for line in rc.encode()[5:-1].split(b"\r\n"))
    assert reply_code(Reply(451, "5.7.1", ("mismatch",))).enhanced == "4.7.1"
    assert reply_code(Reply(550, "5.1.1", ("1 digit first",))).lines == ("1 digit first",)


def test_field_values_stay_one_field() -> None:
    assert field_value("X-A", "a\r\n\tb") == "a\n\tb"
    assert field_value("X-A", "a\r\nInjected: yes") == "a\n Injected: yes"
    assert field_value("X-A", "a\r\n\r\nbody") == "a\n body"  # no empty line


async def test_over_a_unix_socket_refusals_wait_for_an_event_postfix_waits_on(
    dns_server: DnsServer, tmp_path
) -> None:
    """Over a unix socket Postfix does not wait on connect, HELO, MAIL, header
    fields, the end of the header or body chunks (ops/server.UNIX_NEEDS): a client
    refused at connect hears it at RCPT, a message too big (in its header or its
    body) hears it at the end, and nothing is sent for the events Postfix does not
    wait on."""
    text = config_text(None, "[limits]\nmessage_size = 3000\n", server={"listen": "[]"})
    text += '[milter]\nlisten = ["inet:127.0.0.1:0"]\n'
    app = build(loads(text, str(tmp_path / "spamgate.toml")))
    server = MilterServer(MilterGate(app), unix_needs=UNIX_NEEDS)
    path = await server.listen_unix(str(tmp_path / "milter.sock"))
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        mta = MtaClient(reader, writer)
        await mta.send(optneg())
        code, data = await mta.response()
        protocol = struct.unpack("!III", data[:12])[2]
        assert code == b"O" and protocol & 0x1000 and protocol & 0x80  # NR_CONN, NR_HDR
        assert protocol & 0x40000 and protocol & 0x80000  # NR_EOH, NR_BODY
        # a stranger relaying: MAIL and HELO go unanswered, RCPT is refused
        await mta.send(
            connect("[127.0.0.40]", "127.0.0.40", 40000),
            mta_packet(b"H", cstrings("c.example.test")),
            mail("a@example.org"),
            rcpt("x@elsewhere.test"),
        )
        code, data = await mta.response()
        assert code == b"y" and packet_text(data).startswith("554 5.7.1 "), data
        await mta.send(rcpt("u@example.test"))
        assert await mta.response() == (b"c", b"")
        await mta.send(mta_packet(b"T"))
        assert await mta.response() == (b"c", b"")
        await mta.send(
            mta_packet(b"L", cstrings("Subject", " big")),
            mta_packet(b"N"),
            mta_packet(b"B", b"x" * 2000),
            mta_packet(b"B", b"y" * 2000),
            mta_packet(b"E"),
        )
        code, data = await mta.response()  # the first answer since RCPT's
        assert code == b"y" and packet_text(data).startswith("552 5.3.4 "), data
        # the next message is too big in its header: refused at its end too
        await mta.send(mta_packet(b"A"), mail("a@example.org"), rcpt("u@example.test"))
        assert await mta.response() == (b"c", b"")
        await mta.send(mta_packet(b"T"))
        assert await mta.response() == (b"c", b"")
        await mta.send(
            mta_packet(b"L", cstrings("Subject", " " + "h" * 3500)),
            mta_packet(b"N"),
            mta_packet(b"B", b"body\r\n"),
            mta_packet(b"E"),
        )
        code, data = await mta.response()
        assert code == b"y" and packet_text(data).startswith("552 5.3.4 "), data
        # a header of exactly message_size: the end of the header crosses the limit,
        # an event Postfix does not wait on either; refused at the end, and the
        # message after it is answered at its own end (no answer left over)
        for value in (" " + "h" * 2989, " fine"):
            await mta.send(mta_packet(b"A"), mail("a@example.org"), rcpt("u@example.test"))
            assert await mta.response() == (b"c", b"")
            await mta.send(mta_packet(b"T"))
            assert await mta.response() == (b"c", b"")
            assert len(f"Subject:{value}\r\n") == 3000 or value == " fine"
            await mta.send(
                mta_packet(b"L", cstrings("Subject", value)),
                mta_packet(b"N"),
                mta_packet(b"E"),
            )
            code, data = await mta.response()
            while code in b"hi":  # the fields spamgate adds to a message it accepts
                code, data = await mta.response()
            if value == " fine":
                assert code in (b"c", b"a"), (code, data)
            else:
                assert code == b"y" and packet_text(data).startswith("552 5.3.4 "), data
        await mta.send(mta_packet(b"A"), mta_packet(b"Q"))
        assert await mta.closed()
    finally:
        await server.close(grace=0.2)
        await app.aclose()
