"""The shared resolver against a real DNS server on loopback: answers, the cache,
in-flight de-duplication, bounded time when DNS is down or slow, and FCrDNS."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from spamgate import resolver as resolver_module
from spamgate.config import DnsSettings
from spamgate.resolver import TEMPUNAVAIL, UNAVAILABLE, DnsError, DnsResolver, Resolver
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample


def make_resolver(server: DnsServer, **kw) -> Resolver:
    settings = {"timeout": 0.3, "lifetime": 0.6, **kw}
    return DnsResolver(DnsSettings(nameservers=[server.address], **settings))


async def test_answers_negative_answers_and_texts(dns_server: DnsServer) -> None:
    dns_server.zone(
        "ex.test",
        {
            "@": {"A": ["127.0.0.7", "127.0.0.8"], "TXT": "v=spf1 -all"},
            "sub.deep": {"A": "1.2.3.4"},
        },
    )
    r = make_resolver(dns_server)
    a = await r.lookup("ex.test", "A")
    assert (a.status, sorted(a.addresses)) == ("answer", ["127.0.0.7", "127.0.0.8"])
    assert (await r.lookup("EX.test.", "TXT")).texts == ["v=spf1 -all"]
    assert (await r.lookup("nothing.ex.test", "A")).status == "nxdomain"
    assert (await r.lookup("ex.test", "MX")).status == "nodata"
    assert (await r.lookup("deep.ex.test", "A")).status == "nodata"  # empty non-terminal
    assert (await r.lookup("elsewhere.test", "A")).status == "nxdomain"
    # a name that cannot exist is answered without asking
    before = dns_server.total
    assert (await r.lookup("a..b.test", "A")).status == "nxdomain"
    assert (await r.lookup("x" * 64 + ".test", "A")).status == "nxdomain"
    assert dns_server.total == before


async def test_a_txt_record_of_no_strings_is_an_answer(dns_server: DnsServer) -> None:
    # RFC 1035 wants one string or more; zero (RDLENGTH 0) is met in the wild.
    # dnspython refuses to build such a record, dropped the whole response as
    # malformed, and the lookup waited out its lifetime as a "timeout".
    dns_server.zone("empty.test", {"@": {"TXT": r"\# 0"}, "two": {"TXT": [r"\# 0", "x"]}})
    r = make_resolver(dns_server, timeout=1.0, lifetime=2.0)
    started = time.monotonic()
    answer = await r.lookup("empty.test", "TXT")
    assert time.monotonic() - started < 0.5
    assert answer.status == "answer"
    assert [rr.strings for rr in answer.records] == [()]
    assert answer.texts == [""]
    assert sorted((await r.lookup("two.empty.test", "TXT")).texts) == ["", "x"]
    assert dns_server.count("empty.test", "TXT") == 1


async def test_a_cname_loop_is_a_dns_error(dns_server: DnsServer) -> None:
    # (as from a recursive resolver, which says SERVFAIL); SPF then decides what
    # the error means where it is met (tests/e2e/test_spf.py)
    dns_server.zone("loop.test", {"a": {"CNAME": "b.loop.test."}, "b": {"CNAME": "a.loop.test."}})
    r = make_resolver(dns_server)
    started = time.monotonic()
    with pytest.raises(DnsError) as err:
        await r.lookup("a.loop.test", "A")
    assert err.value.kind == "error"
    assert time.monotonic() - started < 0.3


async def test_cache_honours_ttls_including_negative_answers(dns_server: DnsServer) -> None:
    dns_server.zone("keep.test", {"@": {"A": "127.0.0.1"}}, ttl=300, negative_ttl=300)
    dns_server.zone("zero.test", {"@": {"A": "127.0.0.1"}}, ttl=0, negative_ttl=0)
    r = make_resolver(dns_server)
    cached_before = sample("spamgate_dns_queries_total", type="A", result="cached")
    for _ in range(3):
        await r.lookup("keep.test", "A")
        await r.lookup("gone.keep.test", "A")  # NXDOMAIN
        await r.lookup("keep.test", "MX")  # no data
        await r.lookup("zero.test", "A")
        await r.lookup("gone.zero.test", "A")
    assert dns_server.count("keep.test", "A") == 1
    assert dns_server.count("gone.keep.test") == 1
    assert dns_server.count("keep.test", "MX") == 1
    # TTL 0: never kept, every lookup asks again
    assert dns_server.count("zero.test", "A") == 3
    assert dns_server.count("gone.zero.test") == 3
    # NXDOMAIN holds for every type of the name (RFC 2308)
    assert (await r.lookup("gone.keep.test", "TXT")).status == "nxdomain"
    assert dns_server.count("gone.keep.test") == 1
    assert sample("spamgate_dns_queries_total", type="A", result="cached") - cached_before == 4


async def test_cached_answers_expire_with_their_ttl(dns_server: DnsServer) -> None:
    """The text-keyed front of the cache keeps an answer exactly as long as dnspython's."""
    dns_server.zone("short.test", {"@": {"A": "127.0.0.1"}}, ttl=1, negative_ttl=1)
    r = make_resolver(dns_server)
    first = await r.lookup("short.test", "A")
    assert time.time() < first.expires <= time.time() + 1
    assert (await r.lookup("gone.short.test", "A")).expires <= time.time() + 1
    for _ in range(3):
        assert r.cached("short.test", "A") == first
        assert (await r.lookup("gone.short.test", "A")).status == "nxdomain"
    assert dns_server.count("short.test", "A") == 1
    assert dns_server.count("gone.short.test") == 1
    await asyncio.sleep(1.1)
    assert r.cached("short.test", "A") is None
    assert r.cached("gone.short.test", "A") is None
    assert (await r.lookup("short.test", "A")).addresses == ["127.0.0.1"]
    assert dns_server.count("short.test", "A") == 2


async def test_a_thousand_identical_lookups_are_one_query(dns_server: DnsServer) -> None:
    dns_server.zone("bl.test", {"2.0.0.127": {"A": "127.0.0.2"}})
    dns_server.delay = 0.2
    r = make_resolver(dns_server)
    results = await asyncio.gather(*(r.lookup("2.0.0.127.bl.test", "A") for _ in range(1000)))
    assert {tuple(a.addresses) for a in results} == {("127.0.0.2",)}
    assert dns_server.count("2.0.0.127.bl.test") == 1


async def test_errors_are_not_cached(dns_server: DnsServer) -> None:
    dns_server.zone("flaky.test", {"@": {"A": "127.0.0.1"}})
    dns_server.fail("flaky.test")
    r = make_resolver(dns_server)
    with pytest.raises(DnsError) as err:
        await r.lookup("flaky.test", "A")
    assert err.value.kind == "error" and "SERVFAIL" in err.value.detail
    dns_server.failing.clear()
    assert (await r.lookup("flaky.test", "A")).addresses == ["127.0.0.1"]
    assert dns_server.count("flaky.test") == 2


async def test_resolver_down_costs_at_most_the_lifetime(dns_server: DnsServer) -> None:
    dns_server.down = True
    # without the circuit breaker, which would cut this short (test_dns_breaker.py)
    r = make_resolver(dns_server, timeout=0.2, lifetime=0.5, breaker_failures=0)
    started = time.monotonic()
    results = await asyncio.gather(
        *(r.lookup(f"{i}.down.test", "A") for i in range(50)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(e, DnsError) and e.kind == "timeout" for e in results)
    assert 0.45 < elapsed < 1.5
    # the resolver retried within its lifetime (timeout per attempt < lifetime)
    assert dns_server.count("0.down.test") >= 2


async def test_slow_answers_within_lifetime_and_late_ones_cut_off(dns_server: DnsServer) -> None:
    dns_server.zone("slow.test", {"ok": {"A": "127.0.0.1"}, "late": {"A": "127.0.0.1"}})
    dns_server.delays = {"ok.slow.test": 0.15, "late.slow.test": 3.0}
    r = make_resolver(dns_server, timeout=0.4, lifetime=0.6)
    assert (await r.lookup("ok.slow.test", "A")).addresses == ["127.0.0.1"]
    started = time.monotonic()
    with pytest.raises(DnsError):
        await r.lookup("late.slow.test", "A")
    assert time.monotonic() - started < 1.0


async def test_caller_budget_leaves_the_shared_query_running(dns_server: DnsServer) -> None:
    dns_server.zone("slow.test", {"@": {"A": "127.0.0.1"}})
    dns_server.delay = 0.6
    r = make_resolver(dns_server, timeout=1, lifetime=2)
    started = time.monotonic()
    with pytest.raises(DnsError) as err:
        await r.lookup("slow.test", "A", timeout=0.1)
    assert err.value.kind == "timeout" and time.monotonic() - started < 0.45
    # a patient caller joins the same query; the answer lands in the cache
    assert (await r.lookup("slow.test", "A")).addresses == ["127.0.0.1"]
    assert r.cached("slow.test", "A") is not None
    assert dns_server.count("slow.test") == 1


async def test_large_answers_retry_over_tcp(dns_server: DnsServer) -> None:
    strings = [f"part{i}-" + "x" * 240 for i in range(8)]
    dns_server.zone("big.test", {"@": {"TXT": strings}})
    r = make_resolver(dns_server)
    answer = await r.lookup("big.test", "TXT")
    assert sorted(answer.texts) == sorted(strings)
    assert dns_server.count("big.test", "TXT") == 2  # truncated over UDP, then TCP


# -- the verified client name (FCrDNS) ---------------------------------------------------


def reverse_zone(server: DnsServer) -> None:
    server.zone(
        "0.0.127.in-addr.arpa",
        {
            "1": {"PTR": "mx.good.test."},
            "2": {"PTR": "noaddr.good.test."},
            "3": {"PTR": "other.good.test."},
            "4": {"PTR": ["wrong.good.test.", "mx4.good.test."]},
            "5": {"PTR": "bad_name!.good.test."},
            "6": {"PTR": "1.2.3.4."},
        },
    )
    server.zone(
        "good.test",
        {
            "mx": {"A": "127.0.0.1"},
            "other": {"A": "127.0.0.9"},
            "wrong": {"A": "127.0.0.99"},
            "mx4": {"A": ["127.0.0.4", "127.0.0.40"]},
            "mx6": {"AAAA": "::1"},
        },
    )
    server.zone("ip6.arpa", {".".join("1" + "0" * 31): {"PTR": "mx6.good.test."}})


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("127.0.0.1", "mx.good.test"),
        ("127.0.0.2", UNAVAILABLE),  # the name has no address
        ("127.0.0.3", UNAVAILABLE),  # the name points elsewhere
        ("127.0.0.4", "mx4.good.test"),  # the second PTR name confirms
        ("127.0.0.5", UNAVAILABLE),  # not a host name
        ("127.0.0.6", UNAVAILABLE),  # looks like an address
        ("127.0.0.7", UNAVAILABLE),  # no PTR at all
        ("::1", "mx6.good.test"),
    ],
)
async def test_verified_name(dns_server: DnsServer, address: str, name: str) -> None:
    reverse_zone(dns_server)
    r = make_resolver(dns_server)
    assert await r.verified_name(ipaddress.ip_address(address)) == name


async def test_verified_name_kept_while_its_answers_last(dns_server: DnsServer) -> None:
    dns_server.zone("0.0.127.in-addr.arpa", {"1": {"PTR": "mx.short.test."}}, ttl=300)
    dns_server.zone("short.test", {"mx": {"A": "127.0.0.1"}}, ttl=1)
    r = make_resolver(dns_server)
    address = ipaddress.ip_address("127.0.0.1")
    assert await r.verified_name(address) == "mx.short.test"
    asked = dns_server.total
    assert await r.verified_name(address) == "mx.short.test"
    assert dns_server.total == asked
    # the forward answer (TTL 1 s) goes, and with it the name: the address moved
    dns_server.zone("short.test", {"mx": {"A": "127.0.0.9"}}, ttl=1)
    await asyncio.sleep(1.1)
    assert await r.verified_name(address) == UNAVAILABLE
    assert dns_server.count("mx.short.test", "A") == 2


async def test_verified_name_when_dns_fails(dns_server: DnsServer) -> None:
    reverse_zone(dns_server)
    r = make_resolver(dns_server, timeout=0.2, lifetime=0.4)
    dns_server.fail("mx.good.test")
    assert await r.verified_name(ipaddress.ip_address("127.0.0.1")) == TEMPUNAVAIL
    dns_server.failing.clear()  # recovered: a temporary failure is not kept
    assert await r.verified_name(ipaddress.ip_address("127.0.0.1")) == "mx.good.test"
    dns_server.down = True
    started = time.monotonic()
    assert await r.verified_name(ipaddress.ip_address("127.0.0.8")) == TEMPUNAVAIL
    assert time.monotonic() - started < 0.8


async def test_xclient_name_is_the_verified_name(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    reverse_zone(dns_server)
    gate = await gate_factory(resolver={"timeout": "0.2", "lifetime": "0.3"})
    for source, expected in (("127.0.0.1", "mx.good.test"), ("127.0.0.2", UNAVAILABLE)):
        c, _ = await gate.client(source=source)
        replies = await c.mail("a@good.test", ["u@example.test"], b"Subject: x\r\n\r\nx\r\n")
        assert replies[-1].code == 250
        await c.close()
        attrs = dict(a.split("=", 1) for a in sink.messages[-1].xclient[-1].split())
        assert attrs["NAME"] == expected
    dns_server.down = True
    c, _ = await gate.client(source="127.0.0.9")
    replies = await c.mail("a@good.test", ["u@example.test"], b"Subject: x\r\n\r\nx\r\n")
    attrs = dict(a.split("=", 1) for a in sink.messages[-1].xclient[-1].split())
    assert attrs["NAME"] == TEMPUNAVAIL


async def test_reverse_lookup_off_asks_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    reverse_zone(dns_server)
    gate = await gate_factory(resolver={"reverse_lookup": "false"})
    c, _ = await gate.client()
    replies = await c.mail("a@good.test", ["u@example.test"], b"Subject: x\r\n\r\nx\r\n")
    assert replies[-1].code == 250
    assert dns_server.total == 0
    assert "NAME=[UNAVAILABLE]" in sink.messages[0].xclient[0]


def test_nameservers_are_addresses() -> None:
    from spamgate.app import loads
    from spamgate.config.settings import ConfigError

    cfg = loads('[dns]\nnameservers = ["127.0.0.1:5353", "[::1]:53"]\n')
    assert cfg.dns.nameservers == ["127.0.0.1:5353", "[::1]:53"]
    with pytest.raises(ConfigError) as err:
        loads('[dns]\nnameservers = ["ns.example.test:53"]\n', "g.toml")
    assert err.value.problems == [
        'g.toml:2: [dns] nameservers: "ns.example.test:53" is not "address:port" '
        "(an IP address, not a name)"
    ]


async def test_expired_answers_are_swept_from_the_cache(dns_server: DnsServer, monkeypatch) -> None:
    """Names asked for once (a DNS list query per client) must not stay in the
    cache after their TTL until cache_size pushes them out: memory stays flat."""
    dns_server.zone("once.test", {f"n{i}": {"A": "127.0.0.2"} for i in range(50)}, ttl=1)
    r = make_resolver(dns_server)
    await asyncio.gather(*(r.lookup(f"n{i}.once.test", "A") for i in range(50)))
    await asyncio.gather(*(r.lookup(f"x{i}.once.test", "A") for i in range(50)))  # NXDOMAIN
    assert len(r.cache.data) == 100
    for i in range(50):  # read again: now also in the front cache
        assert r.cached(f"n{i}.once.test", "A") is not None
    assert len(r._front) == 50
    monkeypatch.setattr(resolver_module, "PURGE_INTERVAL", 0.0)
    await asyncio.sleep(1.1)
    await r.lookup("n0.once.test", "A")  # any lookup that goes to the network sweeps
    assert len(r.cache.data) == 1
    assert len(r._front) == 0
