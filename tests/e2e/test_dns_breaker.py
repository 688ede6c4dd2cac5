"""The circuit breaker per nameserver: a resolver that is down costs one lifetime,
not one per lookup.

Two kinds of dead resolver, as met in production: one whose port is closed (the
kernel answers ICMP port unreachable; asyncio's sockets show it as silence) and one
that black-holes every packet (a UDP socket that never answers). After
`breaker_failures` queries in a row without an answer the nameserver counts as
down: logged and counted once, lookups fail at once, and a probe brings it back
as soon as it answers again. SERVFAIL is an answer and opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from spamgate.config import DnsSettings
from spamgate.resolver import DnsError, DnsResolver, Resolver
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample

TIMEOUT, LIFETIME = 0.3, 0.7


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port nothing listens on (UDP and TCP): ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A UDP socket that receives every query and answers none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


KINDS = {"dead": dead_port, "black-hole": black_hole}


def make_resolver(*addresses: str, failures: int = 3, probe: float = 0.2) -> Resolver:
    return DnsResolver(
        DnsSettings(
            nameservers=list(addresses),
            timeout=TIMEOUT,
            lifetime=LIFETIME,
            breaker_failures=failures,
            probe_interval=probe,
        )
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_a_dead_nameserver_is_found_down_once_and_then_costs_nothing(
    kind: str, caplog
) -> None:
    with KINDS[kind]() as port:
        label = f"127.0.0.1:{port}"
        r = make_resolver(label)
        try:
            caplog.set_level(logging.WARNING, logger="spamgate.dns")
            before = sample("spamgate_dns_queries_total", type="A", result="breaker_open")
            # three lookups at once: each waits for its first attempt, then the
            # breaker opens under all of them
            started = time.monotonic()
            first = await asyncio.gather(
                *(r.lookup(f"{i}.x.test", "A") for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(e, DnsError) for e in first), first
            assert time.monotonic() - started < LIFETIME + 0.3
            assert sample("spamgate_dns_nameserver_up", nameserver=label) == 0
            assert sample("spamgate_dns_breaker_opened_total", nameserver=label) == 1
            # now every lookup fails at once, without a query
            for i in range(20):
                started = time.monotonic()
                with pytest.raises(DnsError) as err:
                    await r.lookup(f"later{i}.x.test", "TXT")
                assert time.monotonic() - started < 0.05
            assert "no nameserver is answering" in str(err.value)
            assert err.value.kind == "error"
            assert sample("spamgate_dns_queries_total", type="TXT", result="breaker_open") >= 20
            assert sample("spamgate_dns_queries_total", type="A", result="breaker_open") == before
            # logged and counted once, however many lookups it cut short
            downs = [m for m in caplog.messages if m.startswith(f"nameserver {label} is down")]
            assert len(downs) == 1, caplog.messages
            assert sample("spamgate_dns_breaker_opened_total", nameserver=label) == 1
        finally:
            await r.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_the_breaker_closes_when_answers_come_back(kind: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spamgate.dns")
    server = DnsServer()
    held = socket.socket()  # keeps the TCP port for the server that comes later
    if kind == "black-hole":
        await server.start()
        server.down = True  # receives, never answers
        port = server.port
    else:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))  # free for UDP too; closed again: dead
    server.zone("back.test", {"@": {"A": "127.0.0.9"}})
    label = f"127.0.0.1:{port}"
    r = make_resolver(label, failures=2, probe=0.1)
    try:
        for i in range(2):
            with pytest.raises(DnsError):
                await r.lookup(f"{i}.back.test", "A")
        assert not r.nameservers[0].up
        with pytest.raises(DnsError):
            await r.lookup("back.test", "A")
        # the resolver comes back: the next probe finds it, lookups resolve again
        if kind == "black-hole":
            server.down = False
        else:
            held.close()
            await server.start(port)
        async with asyncio.timeout(3):
            while not r.nameservers[0].up:
                await asyncio.sleep(0.02)
        assert (await r.lookup("back.test", "A")).addresses == ["127.0.0.9"]
        assert sample("spamgate_dns_nameserver_up", nameserver=label) == 1
        assert f"nameserver {label} answers again: lookups use it again" in caplog.messages
        # the probe asked the root's NS records, which any resolver answers
        assert server.count(".", "NS") >= 1
    finally:
        held.close()
        await r.aclose()
        await server.stop()


async def test_servfail_is_an_answer_and_opens_nothing(dns_server: DnsServer) -> None:
    dns_server.zone("broken.test", {"@": {"A": "127.0.0.1"}})
    dns_server.fail(*(f"{i}.broken.test" for i in range(10)))
    r = make_resolver(dns_server.address, failures=2)
    try:
        for i in range(10):
            with pytest.raises(DnsError) as err:
                await r.lookup(f"{i}.broken.test", "A")
            assert "SERVFAIL" in str(err.value)
        assert r.nameservers[0].up
        assert (await r.lookup("broken.test", "A")).addresses == ["127.0.0.1"]
    finally:
        await r.aclose()


async def test_a_dead_nameserver_among_live_ones_is_skipped(dns_server: DnsServer) -> None:
    dns_server.zone("live.test", {f"n{i}": {"A": "127.0.0.5"} for i in range(10)})
    with black_hole() as port:
        r = make_resolver(f"127.0.0.1:{port}", dns_server.address, failures=2)
        try:
            # the first lookups try the dead one first, then the live one
            for i in range(2):
                assert (await r.lookup(f"n{i}.live.test", "A")).addresses == ["127.0.0.5"]
            assert not r.nameservers[0].up and r.nameservers[1].up
            # then only the live one: no attempt waits on the dead one
            started = time.monotonic()
            for i in range(2, 10):
                assert (await r.lookup(f"n{i}.live.test", "A")).addresses == ["127.0.0.5"]
            assert time.monotonic() - started < TIMEOUT
        finally:
            await r.aclose()


def test_breaker_failures_zero_is_off() -> None:
    r = DnsResolver(DnsSettings(nameservers=["127.0.0.1:9"], breaker_failures=0))
    for _ in range(100):
        r.nameservers[0].unanswered("timeout")
    assert r.nameservers[0].up


# -- whole sessions during an outage ---------------------------------------------------

CONFIG = """
[dnsbl]
sites = ["bl.test=127.0.0.[2..11]"]

[spf]
enabled = true

[dkim]
enabled = true

[dmarc]
enabled = true
"""
SIGNED = Signer("signed.test", "sel").sign(message("alice@signed.test"))


async def timed_session(gate, source: str) -> tuple[list[int], list[float]]:
    """Greeting, EHLO, MAIL, RCPT, DATA, the message: reply codes and how long each took."""
    waits: list[float] = []
    started = time.monotonic()
    c, banner = await gate.client(source=source)
    waits.append(time.monotonic() - started)
    codes = [banner.code]
    for line in (
        "EHLO mx.signed.test",
        "MAIL FROM:<alice@signed.test>",
        "RCPT TO:<u@example.test>",
    ):
        started = time.monotonic()
        codes.append((await c.cmd(line, timeout=30)).code)
        waits.append(time.monotonic() - started)
    started = time.monotonic()
    codes.append((await c.cmd("DATA", timeout=30)).code)
    await c.send(SIGNED + b".\r\n")
    codes.append((await c.reply(30)).code)
    waits.append(time.monotonic() - started)
    await c.close()
    return codes, waits


@pytest.mark.parametrize("kind", KINDS)
async def test_every_reply_within_a_second_once_the_breaker_is_open(
    gate_factory: GateFactory, sink: Sink, kind: str
) -> None:
    # The defaults: 2 s per attempt, 5 s per lookup, 5 failures. Before the breaker,
    # the greeting waited 10 s (verified name, then the DNS list), EHLO and MAIL 5 s
    # each (SPF), the end of data 5 s or more (DKIM key, DMARC policy), in every
    # session for as long as the outage lasted.
    with KINDS[kind]() as port:
        label = f"127.0.0.1:{port}"
        gate = await gate_factory(
            CONFIG,
            resolver={
                "nameservers": f'["{label}"]',
                "timeout": "2.0",
                "lifetime": "5.0",
                "probe_interval": "1.0",
            },
        )
        # the first sessions of the outage meet it: their lookups open the breaker
        first = await asyncio.gather(*(timed_session(gate, f"127.0.0.{2 + i}") for i in range(3)))
        assert sample("spamgate_dns_nameserver_up", nameserver=label) == 0
        assert all(codes == [220, 250, 250, 250, 354, 250] for codes, _ in first), first
        # from then on: nothing waits on DNS; outcomes as for any DNS failure
        # (lists refuse nobody, SPF/DKIM/DMARC temperror let through)
        results = await asyncio.gather(
            *(timed_session(gate, f"127.0.0.{10 + i}") for i in range(20))
        )
        worst = max(max(waits) for _, waits in results)
        assert worst < 1.0, [waits for _, waits in results]
        assert all(codes == [220, 250, 250, 250, 354, 250] for codes, _ in results)
        assert len(sink.messages) == 23
        last = sink.messages[-1].content
        assert b"spf=temperror" in last and b"dkim=temperror" in last
        assert sample("spamgate_dns_breaker_opened_total", nameserver=label) == 1
