"""DMARC over real sockets: SPF and DKIM against the test DNS server, the From
domain's policy published there, and what the upstream sink receives."""

from __future__ import annotations

import functools
import ipaddress
import logging

import pytest

from spamgate.app import build_policy, loads
from spamgate.checks.dmarc import DmarcCheck, org_domain
from spamgate.config.settings import ConfigError
from spamgate.message import Message
from spamgate.model import Client, Session, Stage, Transaction
from spamgate.pipeline.check import CheckContext
from spamgate.pipeline.ledger import Ledger
from spamgate.pipeline.verdict import CheckFailures
from spamgate.services import Services
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, config_text, sample

SPF_OK = "v=spf1 ip4:127.0.0.0/8 -all"
SPF_SOFT = "v=spf1 ~all"
CONFIG = """
[spf]
enabled = true
helo = false

[dkim]
enabled = true

[dmarc]
enabled = true
"""

DKIM = Signer("dkim.test", "sel")
ORG = Signer("org.test", "sel")
SORG = Signer("strict.test", "sel")


def publish(server: DnsServer) -> None:
    # Aligned by SPF only: its own servers, no signature.
    server.zone("spf.test", {"@": {"TXT": SPF_OK}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}})
    # Aligned by DKIM only: the bounces go to an ESP, whose SPF passes.
    server.zone(
        "dkim.test",
        {
            "@": {"TXT": SPF_SOFT},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
            DKIM.name: {"TXT": DKIM.record},
        },
    )
    server.zone("esp.test", {"@": {"TXT": SPF_OK}})
    for name, policy in (("reject", "reject"), ("quarantine", "quarantine"), ("none", "none")):
        server.zone(
            f"{name}.test", {"@": {"TXT": SPF_SOFT}, "_dmarc": {"TXT": f"v=DMARC1; p={policy}"}}
        )
    # Subdomains: the policy is the organisational domain's.
    server.zone(
        "org.test",
        {
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
            "mail": {"TXT": SPF_OK},
            ORG.name: {"TXT": ORG.record},
        },
    )
    server.zone(
        "strict.test",
        {
            "_dmarc": {"TXT": "v=DMARC1; p=reject; aspf=s; adkim=s"},
            "mail": {"TXT": SPF_OK},
            SORG.name: {"TXT": SORG.record},
        },
    )
    server.zone(
        "sp.test", {"_dmarc": {"TXT": "v=DMARC1; p=reject; sp=none"}, "news": {"TXT": SPF_SOFT}}
    )
    server.zone(
        "pct.test", {"@": {"TXT": SPF_SOFT}, "_dmarc": {"TXT": "v=DMARC1; p=reject; pct=0"}}
    )
    server.zone("bad.test", {"@": {"TXT": SPF_SOFT}, "_dmarc": {"TXT": "v=DMARC1; p=maybe"}})
    server.zone(
        "two.test",
        {"@": {"TXT": SPF_SOFT}, "_dmarc": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}},
    )
    server.zone("temp.test", {"@": {"TXT": SPF_SOFT}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}})
    server.fail("_dmarc.temp.test")
    server.zone("tempspf.test", {"@": {"TXT": SPF_OK}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}})
    server.fail("tempspf.test")


async def send(gate, mail_from: str, content: bytes):
    return (await gate.send(content, sender=mail_from, helo="mx.client.test"))[-1]


@pytest.fixture
async def gate(gate_factory: GateFactory, dns_server: DnsServer):
    publish(dns_server)
    return await gate_factory(CONFIG)


async def test_aligned_by_spf_only(gate, sink: Sink) -> None:
    reply = await send(gate, "alice@spf.test", message("alice@spf.test"))
    assert reply.code == 250
    assert b"X-Spam-Flag" not in sink.messages[0].content


async def test_aligned_by_dkim_only(gate, sink: Sink) -> None:
    signed = DKIM.sign(message("alice@dkim.test"))
    assert (await send(gate, "bounce-123@esp.test", signed)).code == 250
    # the same message, its signature broken: neither aligns, p=reject
    broken = signed.replace(b"Hello", b"Hi")
    reply = await send(gate, "bounce-123@esp.test", broken)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")


async def test_neither_aligned_with_p_reject_is_refused(gate, sink: Sink) -> None:
    before = sample("spamgate_verdicts_total", stage="eod", check="dmarc", action="reject")
    reply = await send(gate, "bounce@esp.test", message("ceo@reject.test"))
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert reply.text == (
        "5.7.1 Unauthenticated mail from reject.test refused by the DMARC policy of "
        "reject.test (p=reject)"
    )
    assert sink.messages == []
    assert sample("spamgate_verdicts_total", stage="eod", check="dmarc", action="reject") == (
        before + 1
    )
    assert sample("spamgate_auth_results_total", method="dmarc", result="fail") >= 1


async def test_quarantine_is_tagged_and_none_is_not(gate, sink: Sink) -> None:
    assert (await send(gate, "bounce@esp.test", message("a@quarantine.test"))).code == 250
    head = sink.messages[0].content.split(b"\r\n\r\n")[0]
    assert b"X-Spam-Flag: YES\r\nX-Spam-Score: 5.0\r\nX-Spam-Symbols: DMARC_QUARANTINE" in head
    assert (await send(gate, "bounce@esp.test", message("a@none.test"))).code == 250
    assert b"X-Spam-Flag" not in sink.messages[1].content


async def test_a_subdomain_under_relaxed_and_strict_alignment(gate, sink: Sink) -> None:
    # From news.org.test: no policy of its own, org.test's applies (relaxed)
    relaxed_spf = await send(gate, "bounce@mail.org.test", message("a@news.org.test"))
    assert relaxed_spf.code == 250
    relaxed_dkim = ORG.sign(message("a@news.org.test"))
    assert (await send(gate, "bounce@esp.test", relaxed_dkim)).code == 250
    # strict.test wants exact domains: the same two messages fail, and p=reject
    strict_spf = await send(gate, "bounce@mail.strict.test", message("a@news.strict.test"))
    assert (strict_spf.code, strict_spf.enhanced) == (550, "5.7.1")
    assert "DMARC policy of news.strict.test" in strict_spf.text
    strict_dkim = SORG.sign(message("a@news.strict.test"))
    assert (await send(gate, "bounce@esp.test", strict_dkim)).code == 550
    # ...and pass when the domains are the same
    assert (await send(gate, "bounce@esp.test", SORG.sign(message("a@strict.test")))).code == 250
    assert len(sink.messages) == 3


async def test_sp_pct_and_policies_that_do_not_apply(gate, sink: Sink) -> None:
    # sp=none for subdomains of sp.test
    assert (await send(gate, "bounce@esp.test", message("a@news.sp.test"))).code == 250
    # pct=0: p=reject is applied to no message; the rest get quarantine: tagged
    assert (await send(gate, "bounce@esp.test", message("a@pct.test"))).code == 250
    assert b"X-Spam-Symbols: DMARC_QUARANTINE" in sink.messages[-1].content
    # a record without a valid p=, two records: no policy to apply
    assert (await send(gate, "bounce@esp.test", message("a@bad.test"))).code == 250
    assert (await send(gate, "bounce@esp.test", message("a@two.test"))).code == 250
    # no record at all
    assert (await send(gate, "bounce@esp.test", message("a@nodmarc.test"))).code == 250


async def test_what_could_not_be_evaluated_is_not_refused(gate, sink: Sink) -> None:
    # the policy lookup fails: temperror, let through by default
    assert (await send(gate, "bounce@esp.test", message("a@temp.test"))).code == 250
    # SPF of the From domain itself failed to evaluate: it might have aligned
    assert (await send(gate, "a@tempspf.test", message("a@tempspf.test"))).code == 250
    assert sample("spamgate_auth_results_total", method="dmarc", result="temperror") >= 2


async def test_the_from_field_must_name_one_author(gate, sink: Sink) -> None:
    two = b"From: <a@spf.test>\r\n" + message("a@spf.test")
    reply = await send(gate, "a@spf.test", two)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "2 From header fields" in reply.text
    none = message("a@spf.test").replace(b"From: Alice <a@spf.test>\r\n", b"")
    reply = await send(gate, "a@spf.test", none)
    assert reply.code == 550 and "no From header field" in reply.text
    # several addresses: each domain is judged, the strictest policy applies
    both = message("a@spf.test").replace(b"<a@spf.test>", b"<a@spf.test>, <b@reject.test>")
    reply = await send(gate, "a@spf.test", both)
    assert reply.code == 550 and "reject.test" in reply.text
    # a From line two parsers read differently is judged on every domain found
    tricky = message("a@spf.test").replace(b"Alice <a@spf.test>", b"ceo@reject.test <a@spf.test>")
    assert (await send(gate, "a@spf.test", tricky)).code == 550
    assert sink.messages == []


async def test_configured_actions(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, tmp_path
) -> None:
    publish(dns_server)
    quarantine = tmp_path / "held"
    gate = await gate_factory(
        CONFIG + 'p_reject = "hold"\np_quarantine = "reject"\nbad_from = "continue"\n'
        'temperror = "tempfail"\n',
        server={"quarantine": f'"{quarantine}"'},
    )
    assert (await send(gate, "bounce@esp.test", message("a@reject.test"))).code == 250
    assert sink.messages == [] and len(list((quarantine / "new").iterdir())) == 1
    reply = await send(gate, "bounce@esp.test", message("a@quarantine.test"))
    assert reply.code == 550 and "p=quarantine" in reply.text
    reply = await send(gate, "bounce@esp.test", message("a@temp.test"))
    assert (reply.code, reply.enhanced) == (451, "4.7.1")
    two = b"From: <a@spf.test>\r\n" + message("a@spf.test")
    assert (await send(gate, "a@spf.test", two)).code == 250


async def test_monitor_mode_refuses_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG, server={"mode": '"monitor"'})
    before = sample("spamgate_monitor_verdicts_total", stage="eod", check="dmarc", action="reject")
    assert (await send(gate, "bounce@esp.test", message("a@reject.test"))).code == 250
    assert len(sink.messages) == 1
    assert (
        sample("spamgate_monitor_verdicts_total", stage="eod", check="dmarc", action="reject")
        == before + 1
    )


def test_dmarc_needs_spf_and_dkim() -> None:
    config = loads("[dmarc]\nenabled = true\n[spf]\nenabled = true\n", "g.toml")
    with pytest.raises(ConfigError) as err:
        build_policy(config, Services.build(config))
    assert err.value.problems == [
        "g.toml: [dmarc] needs [dkim] enabled: DMARC passes on either, so judging it "
        "without one refuses legitimate mail"
    ]


def test_organisational_domains() -> None:
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("news.org.test") == "org.test"
    assert org_domain("co.uk") is None
    assert org_domain("alice.github.io") == "alice.github.io"  # private suffixes count


# -- a failure of spamgate's own is never an accept ------------------------------------

FORGED_KEY = Signer("dkim.test", "sel", bits=1024)  # not the key dkim.test publishes


@functools.cache
def large_forgery() -> bytes:
    """A message from p=reject dkim.test, signed in its name with the wrong keys, big
    enough that verifying its three signatures takes a worker over half a second."""
    body = b"".join(b"line %d of a long message  with  spaces\r\n" % i for i in range(150000))
    signed = message("ceo@dkim.test", body=body)
    for signer in (FORGED_KEY, Signer("dkim.test", "ed", kind="ed25519"), FORGED_KEY):
        signed = signer.sign(signed)
    return signed


@pytest.mark.parametrize(
    ("internal_error", "code"), [("tempfail", 451), ("fail", 550), ("temperror", 250)]
)
async def test_dkim_out_of_time_with_the_keys_in_hand_is_our_failure(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, caplog, internal_error, code
) -> None:
    # Before: verification that ran out of time was dkim=temperror, so a would-be
    # fail was dmarc=temperror and let through: a forger's large message beat p=reject.
    publish(dns_server)
    gate = await gate_factory(
        CONFIG.replace("[dkim]\nenabled = true\n", "[dkim]\nenabled = true\ntimeout = 0.25\n")
        + f'internal_error = "{internal_error}"\n'
    )
    before = sample("spamgate_dmarc_internal_errors_total", cause="dkim")
    errors = sample("spamgate_check_errors_total", check="dkim", kind="timeout")
    with caplog.at_level(logging.INFO, logger="spamgate"):
        reply = await send(gate, "bounce@esp.test", large_forgery())
    assert reply.code == code, reply
    if code == 451:
        assert reply.enhanced == "4.3.0"
        assert "DMARC policy of dkim.test (p=reject) could not be applied" in reply.text
        assert "was not applied: internal_error = tempfail" in caplog.text
    assert sample("spamgate_dmarc_internal_errors_total", cause="dkim") == before + 1
    assert sample("spamgate_check_errors_total", check="dkim", kind="timeout") == errors + 1
    assert "check dkim verification took more than 0.25s (the keys were fetched)" in caplog.text
    assert len(sink.messages) == (1 if code == 250 else 0)


async def test_dkim_out_of_time_on_dns_is_still_a_temperror(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    # the signer's key server is slow: the sender's side, not ours
    publish(dns_server)
    dns_server.delays["sel._domainkey.dkim.test"] = 2.0
    gate = await gate_factory(
        CONFIG.replace("[dkim]\nenabled = true\n", "[dkim]\nenabled = true\ntimeout = 0.3\n")
    )
    before = sample("spamgate_dmarc_internal_errors_total", cause="dkim")
    assert (await send(gate, "bounce@esp.test", DKIM.sign(message("a@dkim.test")))).code == 250
    assert b"dkim=temperror" in sink.messages[0].content
    assert sample("spamgate_dmarc_internal_errors_total", cause="dkim") == before


async def test_a_failed_spf_check_that_would_have_aligned(dns_server: DnsServer) -> None:
    publish(dns_server)
    config = loads(config_text(None, CONFIG, dns=dns_server))
    services = Services.build(config)
    pipeline = build_policy(config, services).pipeline
    # Real machinery, broken: the thread pool pyspf runs in is gone.
    services.threads.shutdown()

    async def run(sender: str, author: str):
        client = Client(ipaddress.ip_address("127.0.0.2"), 4000, helo="mx.client.test")
        session = Session("t1", client)
        txn = Transaction(sender)
        session.transaction = txn
        await pipeline.run(CheckContext(Stage.MAIL, session, txn), Ledger({}))
        m = Message(message(author))
        return txn, await pipeline.run(CheckContext(Stage.EOD, session, txn, message=m), Ledger({}))

    try:
        before = sample("spamgate_dmarc_internal_errors_total", cause="spf")
        # SPF of spf.test would have aligned (and passed): not a DMARC fail, a 451
        txn, outcome = await run("a@spf.test", "a@spf.test")
        assert "spf" in txn.results.get(CheckFailures)
        assert (outcome.final.reply.code, outcome.final.reply.enhanced) == (451, "4.3.0")
        assert "local error in the SPF check" in outcome.final.reply.text
        assert sample("spamgate_dmarc_internal_errors_total", cause="spf") == before + 1
        # an envelope domain that cannot align changes nothing: p=reject applies
        _, outcome = await run("bounce@esp.test", "a@reject.test")
        assert outcome.final.reply.code == 550
        # nor does a policy that asks for nothing (p=none, continue)
        _, outcome = await run("a@none.test", "a@none.test")
        assert outcome.final is None
        assert sample("spamgate_dmarc_internal_errors_total", cause="spf") == before + 1
    finally:
        await services.aclose()


async def test_a_failure_of_the_dmarc_check_itself_tempfails(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG)
    (check,) = [c for c in gate.server.runtime.policy.pipeline.checks if c.name == "dmarc"]
    assert check.on_error == "tempfail"

    def broken(*args, **kwargs):  # a bug in the dmarc package, injected
        raise RuntimeError("injected")

    check.dmarc.get_result = broken
    before = sample("spamgate_dmarc_internal_errors_total", cause="dmarc")
    reply = await send(gate, "bounce@esp.test", message("ceo@reject.test"))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert sample("spamgate_dmarc_internal_errors_total", cause="dmarc") == before + 1
    assert sink.messages == []
    off = loads(config_text(None, CONFIG + 'internal_error = "temperror"\n'))
    assert DmarcCheck(off.section("dmarc"), None).on_error == "continue"
