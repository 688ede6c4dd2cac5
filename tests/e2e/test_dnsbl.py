"""DNS lists over real sockets: clients connect from 127.0.0.x (and ::1) to a
spamgate that asks the test DNS server; listed, not listed, error codes, weights,
allowlists, TXT reasons, parallel queries, bounded time, the cache."""

from __future__ import annotations

import asyncio
import logging
import time

from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory, sample

BODY = b"Subject: dnsbl\r\n\r\nhello\r\n"


def publish_bl(dns_server: DnsServer) -> None:
    dns_server.zone(
        "bl.test",
        {
            "2.0.0.127": {"A": "127.0.0.2", "TXT": "Listed; see https://bl.test/q?127.0.0.2"},
            "3.0.0.127": {"A": "127.0.0.3"},
            "4.0.0.127": {"A": "127.255.255.254"},  # "you use an open resolver"
            "5.0.0.127": {"A": "127.0.0.99"},  # outside the filter
            "6.0.0.127": {"A": "192.0.2.1"},  # outside 127/8 (a rewriting resolver)
            "8.0.0.127": {"A": ["127.0.0.2", "127.255.255.252"]},
        },
    )


SITES = """
[dnsbl]
sites = ["bl.test=127.0.0.[2..11]"]
"""


async def send(gate, source: str, sender: str = "a@example.org") -> tuple[RawClient, list]:
    c, banner = await gate.client(source=source)
    assert banner.code == 220
    return c, await c.mail(sender, ["u@example.test"], BODY)


async def test_listed_client_is_refused_with_zone_and_reason(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(SITES)
    listed = sample("spamgate_dnsbl_results_total", zone="bl.test", result="listed")
    _, replies = await send(gate, "127.0.0.2")
    # delayed reject: EHLO and MAIL pass, the refusal comes at RCPT
    assert [r.code for r in replies[:2]] == [250, 250]
    rcpt = replies[2]
    assert (rcpt.code, rcpt.enhanced) == (554, "5.7.1")
    assert rcpt.lines == [
        "5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; "
        "Listed; see https://bl.test/q?127.0.0.2"
    ]
    _, replies3 = await send(gate, "127.0.0.3")
    assert replies3[2].lines == [
        "5.7.1 Service unavailable; client [127.0.0.3] blocked using bl.test"
    ]
    assert sink.messages == []
    assert sample("spamgate_dnsbl_results_total", zone="bl.test", result="listed") - listed == 2


async def test_refusal_at_the_greeting_without_delay_reject(
    gate_factory: GateFactory, dns_server: DnsServer
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(SITES + "\n[smtp]\ndelay_reject = false\n")
    c, banner = await gate.client(source="127.0.0.2")
    assert banner.code == 554 and "blocked using bl.test" in banner.text
    assert (await c.cmd("EHLO x.test")).code == 503  # no service here (RFC 5321 §3.1)


async def test_error_answers_never_refuse_mail(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, caplog
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(SITES)
    errors = sample("spamgate_dnsbl_results_total", zone="bl.test", result="error")
    caplog.set_level(logging.INFO, logger="spamgate")
    for source in ("127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.8", "127.0.0.7"):
        c, replies = await send(gate, source)
        assert [r.code for r in replies] == [250, 250, 250, 354, 250], source
        await c.close()
    assert len(sink.messages) == 5
    assert sample("spamgate_dnsbl_results_total", zone="bl.test", result="error") - errors == 4
    log = caplog.text
    assert "error code 127.255.255.254 (query through a public or open resolver)" in log
    assert "answer 127.0.0.99 outside the filter" in log
    assert "answer 192.0.2.1 outside 127.0.0.0/8" in log
    assert "error code 127.255.255.252" in log  # even beside a listing code


async def test_weights_threshold_and_allowlist(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    for zone, listed in (("a.test", "23"), ("b.test", "3"), ("wl.test", "4")):
        dns_server.zone(zone, {f"{n}.0.0.127": {"A": "127.0.0.2"} for n in listed})
    gate = await gate_factory(
        """
        [dnsbl]
        sites = ["a.test*1", "b.test=127.0.0.2*2", "wl.test=127.0.0.[2..3]*-5"]
        threshold = 3
        """
    )
    _, r2 = await send(gate, "127.0.0.2")  # a only: 1 < 3
    assert r2[-1].code == 250
    _, r3 = await send(gate, "127.0.0.3")  # a + b: 3 >= 3, b is the heavier
    assert r3[2].code == 554 and r3[2].text.endswith("blocked using b.test")
    dns_server.zone("a.test", {"4.0.0.127": {"A": "127.0.0.2"}})
    dns_server.zone("b.test", {"4.0.0.127": {"A": "127.0.0.2"}})
    _, r4 = await send(gate, "127.0.0.4")  # a + b + allowlist: 3 - 5 < 3
    assert r4[-1].code == 250
    assert len(sink.messages) == 2


async def test_score_only_lists_add_symbols(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(
        """
        [dnsbl]
        symbols = { BL_TEST = "bl.test=127.0.0.[2..11]*2.5" }

        [scoring]
        tag = 2
        """
    )
    _, replies = await send(gate, "127.0.0.2")
    assert replies[-1].code == 250
    headers = sink.messages[0].content.split(b"\r\n\r\n", 1)[0]
    assert b"X-Spam-Score: 2.5" in headers and b"X-Spam-Symbols: BL_TEST" in headers


async def test_ipv6_client(gate_factory: GateFactory, dns_server: DnsServer, sink: Sink) -> None:
    nibbles = ".".join("1" + "0" * 31)  # ::1, reversed
    dns_server.zone("bl.test", {nibbles: {"A": "127.0.0.2", "TXT": "v6 listed"}})
    gate = await gate_factory(SITES, server={"listen": '["[::1]:0"]'})
    c, banner = await RawClient.connect(gate.port, "::1")
    assert banner.code == 220
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert (
        replies[2].text
        == "5.7.1 Service unavailable; client [::1] blocked using bl.test; v6 listed"
    )
    assert dns_server.count(f"{nibbles}.bl.test", "A") == 1


async def test_zones_are_asked_in_parallel_within_the_lifetime(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    zones = ("one.test", "two.test", "three.test")
    for z in zones:
        dns_server.zone(z, {"2.0.0.127": {"A": "127.0.0.2"}})
        dns_server.delays[f"2.0.0.127.{z}"] = 0.4
    sites = ", ".join(f'"{z}*0.5"' for z in zones)
    gate = await gate_factory(
        f"[dnsbl]\nsites = [{sites}]\nthreshold = 1.5\n",
        resolver={"timeout": "1.0", "lifetime": "2.0", "reverse_lookup": "false"},
    )
    started = time.monotonic()
    c, banner = await gate.client(source="127.0.0.2")
    assert banner.code == 220
    # the A queries in parallel, then the named zone's TXT: two delays, not four
    assert time.monotonic() - started < 1.2
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[2].code == 554 and "blocked using one.test" in replies[2].text


async def test_dns_down_or_slow_costs_bounded_time_and_refuses_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(
        SITES, resolver={"timeout": "0.2", "lifetime": "0.4", "reverse_lookup": "false"}
    )
    dns_server.down = True
    started = time.monotonic()
    clients = await asyncio.gather(*(gate.client(source="127.0.0.2") for _ in range(10)))
    assert time.monotonic() - started < 0.9
    assert all(banner.code == 220 for _, banner in clients)
    replies = await clients[0][0].mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250  # listed, but the list could not say so
    dns_server.down = False
    dns_server.delay = 0.15  # slow but within the lifetime: the listing counts
    _, replies = await send(gate, "127.0.0.3")
    assert replies[2].code == 554


async def test_second_session_is_answered_from_the_cache(
    gate_factory: GateFactory, dns_server: DnsServer
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(SITES)
    _, first = await send(gate, "127.0.0.2")
    asked = dns_server.total
    assert asked >= 3  # PTR, A, TXT
    _, second = await send(gate, "127.0.0.2")
    assert second[2].text == first[2].text
    assert dns_server.total == asked


async def test_concurrent_sessions_share_one_query(
    gate_factory: GateFactory, dns_server: DnsServer
) -> None:
    publish_bl(dns_server)
    dns_server.delay = 0.2
    gate = await gate_factory(SITES, resolver={"reverse_lookup": "false"})
    clients = await asyncio.gather(*(gate.client(source="127.0.0.3") for _ in range(20)))
    assert all(b.code == 220 for _, b in clients)
    assert dns_server.count("3.0.0.127.bl.test", "A") == 1


async def test_mynetworks_clients_are_not_looked_up(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    dns_server.zone("bl.test", {"1.0.0.127": {"A": "127.0.0.2"}})
    gate = await gate_factory(SITES)  # mynetworks = 127.0.0.1/32
    _, replies = await send(gate, "127.0.0.1")
    assert replies[-1].code == 250
    assert dns_server.count("1.0.0.127.bl.test") == 0


async def test_monitor_mode_counts_what_it_would_refuse(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_bl(dns_server)
    gate = await gate_factory(SITES, server={"mode": '"monitor"'})
    would = sample(
        "spamgate_monitor_verdicts_total", stage="connect", check="dnsbl", action="reject"
    )
    _, replies = await send(gate, "127.0.0.2")
    assert replies[-1].code == 250
    assert (
        sample("spamgate_monitor_verdicts_total", stage="connect", check="dnsbl", action="reject")
        - would
        == 1
    )


async def test_a_refused_client_costs_no_further_lookups(
    gate_factory: GateFactory, dns_server: DnsServer
) -> None:
    publish_bl(dns_server)
    dns_server.zone("bad.test", {"@": {"TXT": "v=spf1 -all"}})
    gate = await gate_factory(SITES + '\n[rhsbl]\nsites = ["dbl.test"]\n\n[spf]\nenabled = true\n')
    _, replies = await send(gate, "127.0.0.2", sender="a@bad.test")
    assert "blocked using bl.test" in replies[2].text
    # HELO and MAIL FROM checks had nothing to add to a refusal already decided
    assert dns_server.count("bad.test") == 0
    assert not [q for q, _ in dns_server.queries if q.endswith("dbl.test")]
    _, replies = await send(gate, "127.0.0.7", sender="a@bad.test")  # not listed
    assert replies[2].code == 550 and dns_server.count("bad.test", "TXT") == 1


async def test_txt_reason_cannot_inject_or_flood(
    gate_factory: GateFactory, dns_server: DnsServer
) -> None:
    dns_server.zone(
        "bl.test",
        {
            "2.0.0.127": {"A": "127.0.0.2", "TXT": "spam\r\n250 2.0.0 fake ok\x00 ünïcode"},
            "3.0.0.127": {"A": "127.0.0.2", "TXT": "x" * 600},
        },
    )
    gate = await gate_factory(SITES)
    _, replies = await send(gate, "127.0.0.2")
    assert replies[2].lines == [
        "5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test; "
        "spam 250 2.0.0 fake ok n code"
    ]
    _, replies = await send(gate, "127.0.0.3")
    assert replies[2].text.endswith("; " + "x" * 197 + "...")
