"""SPF against a real DNS server: every result, RFC 7208's limits, the null sender,
the HELO identity, the time budget, the cache, and the actions over real sockets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import time
from collections.abc import AsyncIterator

import pytest

from spamgate.app import build_policy, loads
from spamgate.checks.engines.spfquery import SpfEngine
from spamgate.checks.spf import SpfHeloResult, SpfResult
from spamgate.config import DnsSettings
from spamgate.model import Client, Session, Stage, Transaction
from spamgate.pipeline.check import CheckContext
from spamgate.pipeline.ledger import Ledger
from spamgate.resolver import DnsResolver
from spamgate.services import Services
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, config_text, sample

BODY = b"Subject: spf\r\n\r\nhello\r\n"


def publish_spf(server: DnsServer) -> None:
    """Zones for every SPF result, seen from a client in 127.0.0.0/8."""
    server.zone("good.test", {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all", "A": "127.0.0.1"}})
    server.zone("bad.test", {"@": {"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}})
    server.zone(
        "exp.test",
        {
            "@": {"TXT": "v=spf1 ip4:192.0.2.0/24 -all exp=why.exp.test"},
            "why": {"TXT": "%{d} mail comes from our servers only, not %{i}"},
        },
    )
    server.zone("soft.test", {"@": {"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}})
    server.zone("neutral.test", {"@": {"TXT": "v=spf1 ?all"}})
    server.zone("nospf.test", {"@": {"A": "127.0.0.1", "TXT": "not an spf record"}})
    server.zone("broken.test", {"@": {"TXT": "v=spf1 ip4:999.0.0.1 -all"}})
    server.zone("temp.test", {"@": {"TXT": "v=spf1 -all"}})
    server.fail("temp.test")
    server.zone(
        "loop.test",
        {
            "@": {"TXT": "v=spf1 include:b.loop.test -all"},
            "b": {"TXT": "v=spf1 include:loop.test -all"},
        },
    )
    includes = " ".join(f"include:i{n}.many.test" for n in range(11))
    server.zone(
        "many.test",
        {"@": {"TXT": f"v=spf1 {includes} ip4:127.0.0.0/8 -all"}}
        | {f"i{n}": {"TXT": "v=spf1 ip4:192.0.2.1 -all"} for n in range(11)},
    )
    server.zone(
        "ten.test",  # exactly 10 lookups: still fine
        {
            "@": {
                "TXT": " ".join(["v=spf1"] + [f"include:i{n}.ten.test" for n in range(9)])
                + " a ip4:127.0.0.0/8 -all",
                "A": "192.0.2.1",
            }
        }
        | {f"i{n}": {"TXT": "v=spf1 ip4:192.0.2.1 -all"} for n in range(9)},
    )
    server.zone(
        "void.test",
        {"@": {"TXT": "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test ip4:127.0.0.0/8 -all"}},
    )
    server.zone(
        "twovoid.test",
        {"@": {"TXT": "v=spf1 a:n1.twovoid.test a:n2.twovoid.test ip4:127.0.0.0/8 -all"}},
    )
    server.zone(
        "mx.test",
        {
            "@": {"TXT": "v=spf1 mx -all", "MX": ["10 mx1.mx.test.", "20 mx2.mx.test."]},
            "mx1": {"A": "192.0.2.7"},
            "mx2": {"A": "127.0.0.2", "AAAA": "::1"},
        },
    )
    server.zone("v6.test", {"@": {"TXT": "v=spf1 ip6:::1 -all"}})
    server.zone("redirect.test", {"@": {"TXT": "v=spf1 redirect=good.test"}})
    # TXT records of no strings (RDLENGTH 0): not SPF records, and no DNS error
    server.zone("empty.test", {"@": {"TXT": r"\# 0"}})
    server.zone("emptytoo.test", {"@": {"TXT": [r"\# 0", "v=spf1 ip4:127.0.0.0/8 -all"]}})
    # ptr: one PTR name of 127.0.0.2 is a CNAME loop (RFC 7208 test suite,
    # ptr-cname-loop), one confirms 127.0.0.2 only if ptrok.test publishes it
    server.zone("0.0.127.in-addr.arpa", {"2": {"PTR": ["l1.ptr.test.", "host.ptr.test."]}})
    server.zone(
        "ptr.test",
        {
            "l1": {"CNAME": "l2.ptr.test."},
            "l2": {"CNAME": "l1.ptr.test."},
            "host": {"A": "127.0.0.2"},
        },
    )
    server.zone("ptrok.test", {"@": {"TXT": "v=spf1 ptr:host.ptr.test -all"}})
    server.zone("ptrloop.test", {"@": {"TXT": "v=spf1 ptr:l1.ptr.test ?all"}})
    server.zone("slow.test", {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}})
    server.delays["slow.test"] = 5.0


@pytest.fixture
async def engine(dns_server: DnsServer) -> AsyncIterator[SpfEngine]:
    publish_spf(dns_server)
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.3, lifetime=0.6))
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        yield SpfEngine(resolver, threads, budget=2.0)


@pytest.mark.parametrize(
    ("sender", "result"),
    [
        ("a@good.test", "pass"),
        ("a@redirect.test", "pass"),
        ("a@bad.test", "fail"),
        ("a@exp.test", "fail"),
        ("a@soft.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@nospf.test", "none"),
        ("a@nowhere.test", "none"),  # NXDOMAIN
        ("a@temp.test", "temperror"),  # SERVFAIL
        ("a@broken.test", "permerror"),  # syntax
        ("a@loop.test", "permerror"),  # include loop
        ("a@many.test", "permerror"),  # 11 DNS lookups > 10
        ("a@ten.test", "pass"),  # 10 DNS lookups
        ("a@void.test", "permerror"),  # 3 void lookups > 2
        ("a@twovoid.test", "pass"),  # 2 void lookups
        ("a@mx.test", "pass"),  # the second MX host is the client
        ("a@empty.test", "none"),  # a TXT record of no strings is no SPF record
        ("a@emptytoo.test", "pass"),  # ...and hides none beside it
        # RFC 7208 §5.5: a DNS error validating one PTR name skips that name
        ("a@ptrok.test", "pass"),  # the other one validates
        ("a@ptrloop.test", "neutral"),  # only the looping one: no match, ?all
    ],
)
async def test_every_result(engine: SpfEngine, sender: str, result: str) -> None:
    outcome = await engine.check("127.0.0.2", sender, "client.example.test")
    assert outcome.result == result, outcome


async def test_details_of_results(engine: SpfEngine, dns_server: DnsServer) -> None:
    exp = await engine.check("127.0.0.2", "a@exp.test", "h.test")
    assert exp.explanation == "exp.test mail comes from our servers only, not 127.0.0.2"
    many = await engine.check("127.0.0.2", "a@many.test", "h.test")
    assert "Too many DNS lookups" in many.explanation
    void = await engine.check("127.0.0.2", "a@void.test", "h.test")
    assert "Void lookup limit of 2 exceeded" in void.explanation
    loop = await engine.check("127.0.0.2", "a@loop.test", "h.test")
    assert (loop.result, loop.explanation) == (
        "permerror",
        "SPF Permanent Error: Too many DNS lookups",
    )
    # each name went on the wire once; the loop was walked in the cache
    assert dns_server.count("loop.test", "TXT") == dns_server.count("b.loop.test", "TXT") == 1
    v6 = await engine.check("::1", "a@v6.test", "h.test")
    assert v6.result == "pass"
    assert (await engine.check("::1", "a@mx.test", "h.test")).result == "pass"  # via AAAA


async def test_a_failed_ptr_lookup_is_no_match(engine: SpfEngine, dns_server: DnsServer) -> None:
    # RFC 7208 §5.5: "If a DNS error occurs while doing the PTR RR lookup, then this
    # mechanism fails to match" (pyspf: temperror)
    dns_server.fail("3.0.0.127.in-addr.arpa")
    assert (await engine.check("127.0.0.3", "a@ptrloop.test", "h.test")).result == "neutral"
    assert (await engine.check("127.0.0.3", "a@ptrok.test", "h.test")).result == "fail"


async def test_null_sender_is_postmaster_at_helo(engine: SpfEngine, dns_server: DnsServer) -> None:
    assert (await engine.check("127.0.0.2", "", "good.test")).result == "pass"
    assert (await engine.check("127.0.0.2", "", "bad.test")).result == "fail"
    assert dns_server.count("good.test", "TXT") == 1


async def test_a_warm_cache_asks_nothing_and_runs_once(
    engine: SpfEngine, dns_server: DnsServer
) -> None:
    cold = await engine.check("127.0.0.2", "a@mx.test", "h.test")
    assert cold.rounds == 3  # TXT; MX with both hosts' addresses at once; done
    asked = dns_server.total
    warm = await engine.check("127.0.0.2", "b@mx.test", "other.test")  # another HELO
    assert (warm.result, warm.rounds) == ("pass", 1)
    assert dns_server.total == asked


async def test_results_remembered_within_the_ttls(dns_server: DnsServer) -> None:
    """The same client, sender domain and HELO: the same result, no pyspf run, until
    the first answer the result came from expires (here the include's, TTL 1 s)."""
    dns_server.zone("memo.test", {"@": {"TXT": "v=spf1 include:_spf.inc.test -all"}})
    dns_server.zone("inc.test", {"_spf": {"TXT": "v=spf1 ip4:127.0.0.2 -all"}}, ttl=1)
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.3, lifetime=0.6))
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        engine = SpfEngine(resolver, threads, budget=2.0)
        first = await engine.check("127.0.0.2", "a@memo.test", "h.test")
        assert (first.result, first.rounds) == ("pass", 3)  # TXT, the include, done
        again = await engine.check("127.0.0.2", "b@memo.test", "h.test")
        assert (again.result, again.rounds) == ("pass", 0)  # remembered
        # another client, or another HELO name, is another question
        other = await engine.check("127.0.0.3", "a@memo.test", "h.test")
        assert (other.result, other.rounds) == ("fail", 1)
        assert (await engine.check("127.0.0.2", "a@memo.test", "h2.test")).rounds == 1
        # the include changes; its TTL runs out: the new record decides
        dns_server.zone("inc.test", {"_spf": {"TXT": "v=spf1 ip4:127.0.0.3 -all"}}, ttl=1)
        await asyncio.sleep(1.1)
        later = await engine.check("127.0.0.2", "a@memo.test", "h.test")
        assert (later.result, later.rounds) == ("fail", 2)
        assert dns_server.count("_spf.inc.test", "TXT") == 2


async def test_results_not_remembered_after_dns_errors_or_with_macros(
    dns_server: DnsServer,
) -> None:
    dns_server.zone(
        "macro.test",
        {"@": {"TXT": "v=spf1 exists:%{l}.ok.macro.test -all"}, "good.ok": {"A": "127.0.0.1"}},
    )
    dns_server.zone("flaky.test", {"@": {"TXT": "v=spf1 include:down.test -all"}})
    dns_server.fail("down.test")
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.3, lifetime=0.6))
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        engine = SpfEngine(resolver, threads, budget=2.0)
        # %{l}: the local part decides, so each sender is evaluated
        assert (await engine.check("127.0.0.2", "good@macro.test", "h.test")).result == "pass"
        bad = await engine.check("127.0.0.2", "bad@macro.test", "h.test")
        assert (bad.result, bad.rounds) == ("fail", 2)
        again = await engine.check("127.0.0.2", "good@macro.test", "h.test")
        assert (again.result, again.rounds) == ("pass", 1)
        # a DNS failure is never the answer for later
        assert (await engine.check("127.0.0.2", "a@flaky.test", "h.test")).result == "temperror"
        retry = await engine.check("127.0.0.2", "a@flaky.test", "h.test")
        assert retry.result == "temperror" and retry.rounds > 0


async def test_the_budget_bounds_a_slow_dns(dns_server: DnsServer) -> None:
    publish_spf(dns_server)
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=1, lifetime=2))
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        engine = SpfEngine(resolver, threads, budget=0.6)
        await engine.check("127.0.0.2", "a@good.test", "h.test")  # warm this one
        started = time.monotonic()
        slow = [engine.check("127.0.0.2", f"a{i}@slow.test", "h.test") for i in range(20)]
        tasks = [asyncio.ensure_future(c) for c in slow]
        await asyncio.sleep(0.05)
        # twenty checks wait on DNS, one thread: a cached check still runs at once,
        # not after the others' budget (as it would if threads waited on DNS)
        quick_start = time.monotonic()
        assert (await engine.check("127.0.0.2", "b@good.test", "h.test")).result == "pass"
        assert time.monotonic() - quick_start < 0.3
        outcomes = await asyncio.gather(*tasks)
        assert time.monotonic() - started < 1.1
    assert {o.result for o in outcomes} == {"temperror"}
    assert "more than 0.6s" in outcomes[0].explanation
    assert dns_server.count("slow.test", "TXT") == 1  # and one query for all twenty


async def test_dns_down_is_temperror(dns_server: DnsServer) -> None:
    resolver = DnsResolver(DnsSettings(nameservers=[dns_server.address], timeout=0.1, lifetime=0.2))
    dns_server.down = True
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        outcome = await SpfEngine(resolver, threads, budget=5).check("127.0.0.2", "a@x.test", "h")
    assert outcome.result == "temperror" and "timeout" in outcome.explanation


# -- the check: results kept, actions, replies over sockets -------------------------------


async def test_results_are_kept_for_later_checks(dns_server: DnsServer, sink: Sink) -> None:
    publish_spf(dns_server)
    config = loads(config_text(sink, "[spf]\nenabled = true\n", dns=dns_server))
    services = Services.build(config)
    pipeline = build_policy(config, services).pipeline
    client = Client(ipaddress.ip_address("127.0.0.2"), 4000, helo="bad.test")
    session = Session("t1", client)
    await pipeline.run(CheckContext(Stage.HELO, session), Ledger({}))
    helo = session.results.get(SpfHeloResult)
    assert helo is not None and (helo.result, helo.domain) == ("fail", "bad.test")
    assert (helo.sender, helo.smtp_property) == ("postmaster@bad.test", "smtp.helo")
    txn = Transaction("someone@Soft.Test")
    session.transaction = txn
    ledger = Ledger({})
    await pipeline.run(CheckContext(Stage.MAIL, session, txn), ledger)
    mail = txn.results.get(SpfResult)
    assert mail is not None and type(mail) is SpfResult
    assert (mail.result, mail.domain, mail.sender) == ("softfail", "soft.test", "someone@Soft.Test")
    assert (mail.client, mail.helo, mail.smtp_property) == (
        "127.0.0.2",
        "bad.test",
        "smtp.mailfrom",
    )
    assert [s.name for s in ledger.scorer.transaction] == ["SPF_SOFTFAIL"]
    null = Transaction("")
    session.transaction = null
    await pipeline.run(CheckContext(Stage.MAIL, session, null), Ledger({}))
    assert null.results.get(SpfResult).sender == "postmaster@bad.test"
    await services.aclose()


async def transaction(gate, sender: str, helo: str = "client.example.test", source="127.0.0.2"):
    c, banner = await gate.client(source=source)
    assert banner.code == 220
    replies = await c.mail(sender, ["u@example.test"], BODY, helo=helo)
    await c.close()
    return replies


async def test_fail_is_refused_with_the_domains_explanation(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_spf(dns_server)
    gate = await gate_factory("[spf]\nenabled = true\n")
    fails = sample("spamgate_auth_results_total", method="spf", result="fail")
    replies = await transaction(gate, "a@exp.test")
    assert [r.code for r in replies[:3]] == [250, 250, 550]  # given at RCPT (delay_reject)
    assert replies[2].text == (
        "5.7.23 SPF MAIL FROM check failed: The domain exp.test explains: "
        "exp.test mail comes from our servers only, not 127.0.0.2"
    )
    replies = await transaction(gate, "a@bad.test")
    assert replies[2].text == (
        "5.7.23 SPF MAIL FROM check failed: bad.test does not authorize [127.0.0.2]"
    )
    for sender in ("a@good.test", "a@neutral.test", "a@nospf.test", "a@temp.test", "a@soft.test"):
        assert (await transaction(gate, sender))[-1].code == 250, sender
    assert len(sink.messages) == 5
    assert sample("spamgate_auth_results_total", method="spf", result="fail") - fails == 2
    assert sample("spamgate_auth_results_total", method="spf", result="temperror") >= 1


async def test_configured_actions(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_spf(dns_server)
    gate = await gate_factory(
        """
        [spf]
        enabled = true
        helo_actions = { fail = "reject" }

        [spf.actions]
        fail = "reject"
        softfail = "score"
        permerror = "reject"
        temperror = "tempfail"

        [scoring]
        tag = 1
        """
    )
    temp = await transaction(gate, "a@temp.test")
    assert (temp[2].code, temp[2].enhanced) == (451, "4.4.3")
    assert temp[2].text.endswith("try again later")
    perm = await transaction(gate, "a@loop.test")
    assert (perm[2].code, perm[2].enhanced) == (550, "5.7.24")
    assert "SPF MAIL FROM check of loop.test: permerror" in perm[2].text
    # a HELO fail is refused at RCPT (delayed reject), MAIL is not even checked
    helo = await transaction(gate, "a@good.test", helo="bad.test")
    assert [r.code for r in helo[:3]] == [250, 250, 550]
    assert helo[2].text == "5.7.23 SPF HELO check failed: bad.test does not authorize [127.0.0.2]"
    soft = await transaction(gate, "a@soft.test")
    assert soft[-1].code == 250
    assert b"X-Spam-Symbols: SPF_SOFTFAIL" in sink.messages[-1].content


async def test_helo_result_scores_by_default(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_spf(dns_server)
    gate = await gate_factory("[spf]\nenabled = true\n\n[scoring]\ntag = 1\n")
    replies = await transaction(gate, "a@good.test", helo="soft.test")
    assert replies[-1].code == 250
    content = sink.messages[0].content
    assert b"X-Spam-Score: 1.5" in content and b"X-Spam-Symbols: SPF_HELO_SOFTFAIL" in content


async def test_null_sender_over_the_wire(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_spf(dns_server)
    gate = await gate_factory("[spf]\nenabled = true\nhelo = false\n")
    refused = await transaction(gate, "", helo="bad.test")
    assert refused[2].code == 550 and "bad.test does not authorize" in refused[2].text
    assert (await transaction(gate, "", helo="good.test"))[-1].code == 250
    # an address literal is no domain: "none", and no lookup
    before = dns_server.total
    assert (await transaction(gate, "", helo="[127.0.0.2]"))[-1].code == 250
    assert dns_server.total == before


async def test_mynetworks_is_not_checked(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_spf(dns_server)
    gate = await gate_factory("[spf]\nenabled = true\n")
    replies = await transaction(gate, "a@bad.test", source="127.0.0.1")
    assert replies[-1].code == 250
    assert dns_server.count("bad.test") == 0


def test_bad_actions_are_config_errors() -> None:
    from spamgate.config.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        loads('[spf]\nactions = { fial = "reject" }\n', "g.toml")
    assert err.value.problems == [
        'g.toml:2: [spf] actions: "fial" is not an SPF result '
        "(pass, fail, softfail, neutral, none, temperror, permerror)"
    ]
    with pytest.raises(ConfigError) as err:
        loads('[spf]\nhelo_actions = { fail = "bounce" }\n', "g.toml")
    assert "expected 'continue' or 'score' or 'reject' or 'tempfail'" in err.value.problems[0]
