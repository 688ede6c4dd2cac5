"""Hostile clients the fuzzer found, or that need a set-up of their own.

Each test is one way a client could hold a session past its timeouts or make
spamgate do work out of proportion; docs/security.md points here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import time

import pytest

from spamgate.checks.engines.spfquery import SpfEngine
from spamgate.config import DnsSettings
from spamgate.resolver import UNAVAILABLE, DnsResolver
from tests.kit.dnsserver import DnsServer

from ..conftest import GateFactory
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


# -- DNS answers that try to inflate the work -----------------------------------------


async def test_many_ptr_names_cost_at_most_ten_lookups(dns_server: DnsServer) -> None:
    """50 PTR names, each with an address: only the first ten are looked up."""
    names = [f"n{i}.many.test." for i in range(50)]
    dns_server.zone("0.0.127.in-addr.arpa", {"2": {"PTR": names}})
    dns_server.zone("many.test", {f"n{i}": {"A": "127.0.0.99"} for i in range(50)})
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.5, lifetime=1))
    assert await resolver.verified_name(ipaddress.ip_address("127.0.0.2")) == UNAVAILABLE
    forward = sum(dns_server.count(f"n{i}.many.test", "A") for i in range(50))
    assert forward == 10


@pytest.mark.parametrize(
    ("record", "result"),
    [
        # 20 includes: RFC 7208 §4.6.4 allows 10 DNS-querying terms
        (" ".join(f"include:i{i}.spf.test" for i in range(20)) + " -all", "permerror"),
        ("include:loop.spf.test -all", "permerror"),  # includes itself, for ever
        ("mx -all", "permerror"),  # an MX with 30 names: more than ten is an error
        (" ".join(f"a:v{i}.spf.test" for i in range(10)) + " -all", "permerror"),  # void
    ],
)
async def test_spf_records_that_inflate_work_are_bounded(
    dns_server: DnsServer, record: str, result: str
) -> None:
    records: dict = {"@": {"TXT": f"v=spf1 {record}"}}
    records |= {f"i{i}": {"TXT": "v=spf1 ip4:192.0.2.1 -all"} for i in range(20)}
    records["loop"] = {"TXT": "v=spf1 include:loop.spf.test -all"}
    records["@"]["MX"] = [f"10 m{i}.spf.test." for i in range(30)]
    records |= {f"m{i}": {"A": "192.0.2.9"} for i in range(30)}
    dns_server.zone("spf.test", records)
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.5, lifetime=1))
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        outcome = await SpfEngine(resolver, threads, budget=5).check(
            "127.0.0.2", "a@spf.test", "h.test"
        )
    assert outcome.result == result, outcome.explanation
    assert dns_server.total <= 25  # one TXT per term at most, and ten MX addresses
    assert time.monotonic() - started < 3
