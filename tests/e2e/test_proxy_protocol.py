"""PROXY protocol v1 and v2 inbound: the real client reaches the upstream via XCLIENT."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from aiosmtpd.proxy_protocol import V2_SIGNATURE

from spamgate import metrics
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory

BODY = b"Subject: proxied\r\n\r\nhello\r\n"
PROXIED = {"proxy_protocol": "true", "proxy_protocol_timeout": "0.5"}


def v1(src: str, dst: str, sport: int = 40000, dport: int = 25) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int = 40000, dport: int = 25, *, local: bool = False) -> bytes:
    """A PROXY v2 header (haproxy's proxy-protocol.txt §2.2), with one TLV for realism."""
    command = 0x20 if local else 0x21
    if local:
        return V2_SIGNATURE + struct.pack("!BBH", command, 0x00, 0)
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21  # AF_INET/AF_INET6, STREAM
    body = s.packed + d.packed + struct.pack("!HH", sport, dport)
    body += struct.pack("!BH", 0x04, 4) + b"noop"  # PP2_TYPE_NOOP
    return V2_SIGNATURE + struct.pack("!BBH", command, fam, len(body)) + body


async def proxied_client(gate, header: bytes) -> tuple[RawClient, object]:
    c, _ = await gate.client(greet=False)
    await c.send(header)
    return c, await c.reply()


def xclient_of(sink: Sink) -> dict[str, str]:
    line = next(cmd for cmd in sink.commands if cmd.startswith("XCLIENT "))
    return dict(a.split("=", 1) for a in line.split()[1:])


async def test_v1_ipv4(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, banner = await proxied_client(gate, v1("203.0.113.7", "192.0.2.25", 51234))
    assert banner.code == 220
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250
    attrs = xclient_of(sink)
    assert (attrs["ADDR"], attrs["PORT"]) == ("203.0.113.7", "51234")


async def test_v1_ipv6(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, banner = await proxied_client(gate, v1("2001:db8::7", "2001:db8::25", 2525))
    assert banner.code == 220
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    attrs = xclient_of(sink)
    assert (attrs["ADDR"], attrs["PORT"]) == ("IPV6:2001:db8::7", "2525")


async def test_v2_ipv4(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, banner = await proxied_client(gate, v2("198.51.100.9", "192.0.2.25", 61000))
    assert banner.code == 220
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    attrs = xclient_of(sink)
    assert (attrs["ADDR"], attrs["PORT"]) == ("198.51.100.9", "61000")


async def test_v2_ipv6(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, banner = await proxied_client(gate, v2("2001:db8:1::9", "2001:db8::25", 3000))
    assert banner.code == 220
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    assert xclient_of(sink)["ADDR"] == "IPV6:2001:db8:1::9"


async def test_v2_header_and_commands_in_one_packet(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, _ = await gate.client(greet=False)
    await c.send(v2("198.51.100.10", "192.0.2.25") + b"EHLO c.example.test\r\n")
    assert (await c.reply()).code == 220
    assert (await c.reply()).code == 250


async def test_proxied_client_is_not_in_mynetworks(gate_factory: GateFactory, sink: Sink) -> None:
    # The balancer connects from 127.0.0.1, which is in mynetworks; the client is not.
    gate = await gate_factory(server=PROXIED)
    c, _ = await proxied_client(gate, v1("203.0.113.8", "192.0.2.25"))
    await c.cmd("EHLO c.example.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<victim@elsewhere.test>")
    assert (r.code, r.enhanced) == (554, "5.7.1")


async def test_v2_local_is_the_balancer_itself(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, banner = await proxied_client(gate, v2("0.0.0.0", "0.0.0.0", local=True))
    assert banner.code == 220  # a health check
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    assert xclient_of(sink)["ADDR"] == "127.0.0.1"


async def bad_header_closes(gate, header: bytes) -> None:
    refused = metrics.SESSIONS_REFUSED.labels("proxy")._value.get()
    c, _ = await gate.client(greet=False)
    await c.send(header)
    data = await asyncio.wait_for(c.reader.read(), 5)
    assert data == b""  # closed, and not a byte said: not even a greeting
    assert metrics.SESSIONS_REFUSED.labels("proxy")._value.get() == refused + 1


async def test_malformed_headers_close_the_connection(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory(server=PROXIED)
    for header in (
        b"PROXY TCP4 203.0.113.7 192.0.2.25 1234\r\n",  # a port missing
        b"PROXY TCP4 203.0.113.777 192.0.2.25 1234 25\r\n",  # not an address
        b"PROXY TCP4 2001:db8::1 192.0.2.25 1234 25\r\n",  # family mismatch
        b"PROXY TCP4 203.0.113.7 192.0.2.25 1234 25\n",  # bare LF
        b"PROXY UNKNOWN\r\n",  # names no client (Postfix refuses it too)
        b"PROXY " + b"9" * 200 + b"\r\n",  # too long
        b"EHLO c.example.test\r\n",  # no header at all
        V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 12) + bytes(12),  # version 3
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + bytes(4),  # truncated address
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216),  # AF_UNIX
        b"\x00" * 16,
    ):
        await bad_header_closes(gate, header)
    assert sink.connections == 0
    # nothing crashed: a good header still works
    _c, banner = await proxied_client(gate, v1("203.0.113.7", "192.0.2.25"))
    assert banner.code == 220


async def test_header_that_never_comes(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server=PROXIED)
    c, _ = await gate.client(greet=False)
    await c.send(b"PROXY TCP4 203.0.113.7")  # ... and then silence
    assert await asyncio.wait_for(c.reader.read(), 5) == b""
    c, _ = await gate.client(greet=False)  # a connection that sends nothing
    assert await asyncio.wait_for(c.reader.read(), 5) == b""


async def test_disconnect_in_the_middle_of_a_header(gate_factory: GateFactory) -> None:
    gate = await gate_factory(server=PROXIED)
    for partial in (b"PRO", V2_SIGNATURE[:7], V2_SIGNATURE + b"\x21\x11\x00\x0c\x01"):
        c, _ = await gate.client(greet=False)
        await c.send(partial)
        await c.close()
    c, banner = await proxied_client(gate, v1("203.0.113.7", "192.0.2.25"))
    assert banner.code == 220


async def test_header_on_a_listener_not_expecting_one(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory()  # proxy_protocol = false
    for header in (v1("203.0.113.7", "192.0.2.25"), v2("203.0.113.7", "192.0.2.25")):
        c, banner = await gate.client()
        assert banner.code == 220
        await c.send(header)
        r = await c.reply()
        assert (r.code, r.enhanced) == (521, "5.5.1")
        assert await c.closed()
    assert sink.connections == 0


async def test_proxy_only_on_the_listener_that_asks(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(
        '[[listener]]\naddress = "127.0.0.1:0"\nproxy_protocol = true\n',
        server={"proxy_protocol_timeout": "0.5"},
    )
    c, banner = await gate.client(listener=0)  # plain SMTP here
    assert banner.code == 220
    c, _ = await gate.client(listener=1, greet=False)
    await c.send(v1("203.0.113.9", "192.0.2.25"))
    assert (await c.reply()).code == 220
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    assert xclient_of(sink)["ADDR"] == "203.0.113.9"
