"""DNS outage and slowness in whole sessions: bounded waits, outcomes by policy.

With reverse lookups, a DNS list and SPF on, every stage that asks DNS must
answer within `[dns] lifetime` per lookup step it takes (connect: the verified
name, then the lists; HELO and MAIL: SPF), however dead or slow the resolver,
and for twenty clients at once as for one. The outcome follows the policy: a
list that cannot answer refuses nobody, SPF temperror continues (the default);
a resolver that is slow but within the lifetime still decides.
bench/chaos.py does the same mid-run, under load.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory

LIFETIME = 0.5
MARGIN = 0.6  # scheduling on a busy 2-core machine
CONFIG = """
[dnsbl]
sites = ["bl.test=127.0.0.[2..11]"]

[spf]
enabled = true
"""
BODY = b"Subject: dns\r\n\r\nbody\r\n"


def publish(dns: DnsServer) -> None:
    dns.zone("bl.test", {"2.0.0.127": {"A": "127.0.0.2"}})
    dns.zone("bad.test", {"@": {"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}})
    dns.zone("helo.test", {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}})


async def timed_session(gate, source: str) -> tuple[list[int], list[float]]:
    """One transaction from a listed client with an SPF-failing sender: the
    reply codes and how long each step waited (greeting, EHLO, MAIL, RCPT)."""
    waits: list[float] = []
    started = time.monotonic()
    c, banner = await gate.client(source=source)
    waits.append(time.monotonic() - started)
    codes = [banner.code]
    for line in ("EHLO helo.test", "MAIL FROM:<a@bad.test>", "RCPT TO:<u@example.test>"):
        started = time.monotonic()
        codes.append((await c.cmd(line)).code)
        waits.append(time.monotonic() - started)
    if codes[-1] == 250:
        assert (await c.cmd("DATA")).code == 354
        await c.send(BODY + b".\r\n")
        codes.append((await c.reply()).code)
    await c.close()
    return codes, waits


@pytest.mark.parametrize("fault", ["down", "slow"])
async def test_outage_costs_bounded_time_and_refuses_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, fault: str
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG, resolver={"timeout": "0.2", "lifetime": str(LIFETIME)})
    if fault == "down":
        dns_server.down = True
    else:
        dns_server.delay = LIFETIME * 3  # answers that come after the lifetime
    results = await asyncio.gather(*(timed_session(gate, f"127.0.0.{2 + i}") for i in range(20)))
    # connect: the verified name, then the list (one lifetime each); HELO, MAIL: SPF
    bounds = [2 * LIFETIME, LIFETIME, LIFETIME, 0.5]
    worst = [max(waits[i] for _, waits in results) for i in range(4)]
    assert all(w < b + MARGIN for w, b in zip(worst, bounds, strict=True)), worst
    # a list that cannot answer refuses nobody; SPF temperror continues
    assert all(codes == [220, 250, 250, 250, 250] for codes, _ in results)
    assert len(sink.messages) == 20


async def test_slow_but_within_the_lifetime_still_decides(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG, resolver={"timeout": "0.4", "lifetime": "1.0"})
    dns_server.delay = 0.1
    codes, _ = await timed_session(gate, "127.0.0.2")  # listed: refused at RCPT
    assert codes == [220, 250, 250, 554]
    codes, _ = await timed_session(gate, "127.0.0.3")  # not listed; SPF fail
    assert codes == [220, 250, 250, 550]  # SPF fail, given at RCPT (delayed reject)
    assert sink.messages == []
