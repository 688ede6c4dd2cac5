"""Look-alike domains never borrow a real domain's DNS: SPF, DMARC, DKIM keys, lists.

A domain written with compatibility characters (the Kelvin sign U+212A, a
full-width letter, a long s) reads as `bank.test` to Python's Unicode case
mapping and to the IDNA 2003 codec, but it is another name, and one with no
IDNA 2008 A-label form: nothing can be registered under it, and DNS is never
asked about it. Each test publishes records for bank.test on the test DNS
server, sends mail from the look-alike through the real proxy socket, and
counts what reached the DNS server.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from spamgate.checks.engines.spfquery import SpfEngine
from spamgate.resolver import Resolver, ascii_domain
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample
from .test_resolver import make_resolver

BANK = Signer("bank.test", "sel")

CONFIG = """
[spf]
enabled = true
helo = false

[dkim]
enabled = true

[dmarc]
enabled = true
bad_from = "score"

[rhsbl]
symbols = { DBL = "dbl.test=127.0.1.[2..99]*1" }
helo = false
"""

LOOKALIKES = [
    "ban\u212a.test",  # Kelvin sign: "k" to str.lower()
    "BAN\u212a.TEST",
    "\uff42ank.test",  # full-width b: "b" to IDNA 2003 (NFKC)
    "bank.te\u017ft",  # long s: "s" to IDNA 2003 and str.upper()
    "bank\u3002test",  # ideographic full stop: a dot to IDNA 2003 and to idna.encode
]


def publish(server: DnsServer) -> None:
    server.zone(
        "bank.test",
        {
            "@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
            BANK.name: {"TXT": BANK.record},
        },
    )
    server.zone("dbl.test", {"bank.test": {"A": "127.0.1.2"}})


def bank_queries(server: DnsServer) -> dict[tuple[str, str], int]:
    """Queries the server received for bank.test or any name under it."""
    return {
        (name, kind): n
        for (name, kind), n in server.queries.items()
        if name == "bank.test" or name.endswith(".bank.test")
    }


def listed() -> float:
    return sample("spamgate_dnsbl_results_total", zone="dbl.test", result="listed")


async def send(gate, domain: str, content: bytes) -> list:
    """One transaction from ceo@`domain` (SMTPUTF8 when it is not ASCII)."""
    c, _ = await gate.client(source="127.0.0.5")
    utf8 = "" if domain.isascii() else " SMTPUTF8"
    replies = [await c.cmd("EHLO mx.client.test"), await c.cmd(f"MAIL FROM:<ceo@{domain}>{utf8}")]
    replies.append(await c.cmd("RCPT TO:<u@example.test>"))
    replies.append(await c.cmd("DATA"))
    await c.send(content + b".\r\n")
    replies.append(await c.reply())
    await c.close()
    return replies


def letter(domain: str) -> bytes:
    text = f"From: CEO <ceo@{domain}>\r\nSubject: wire the money\r\n\r\nToday, please.\r\n"
    return text.encode()


async def test_the_real_domain_gets_its_records(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    """The control: mail from bank.test itself passes SPF and DMARC, is listed."""
    publish(dns_server)
    gate = await gate_factory(CONFIG)
    before = listed()
    replies = await send(gate, "bank.test", letter("bank.test"))
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode()
    assert "spf=pass" in ar and "dmarc=pass" in ar and "header.from=bank.test" in ar
    assert listed() == before + 1
    asked = bank_queries(dns_server)
    assert asked[("bank.test", "TXT")] >= 1 and asked[("_dmarc.bank.test", "TXT")] == 1
    assert dns_server.count("bank.test.dbl.test", "A") == 1


@pytest.mark.parametrize("domain", LOOKALIKES)
async def test_a_lookalike_sender_borrows_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, domain: str
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG)
    before = listed()
    replies = await send(gate, domain, letter(domain))
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    # RFC 7208 §4.3: a malformed domain is SPF "none"; the From domain is no
    # domain name, so DMARC cannot judge it (bad_from, here scored).
    assert "spf=none" in ar, ar
    assert "dmarc=permerror" in ar and "bank.test" not in ar, ar
    assert listed() == before
    assert bank_queries(dns_server) == {}
    assert dns_server.count("bank.test.dbl.test") == 0


async def test_a_lookalike_dkim_domain_fetches_no_key(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    """d= is ASCII in a DKIM-Signature; a backslash in it is a character, not
    dnspython's escape: "ban\\107" is not "bank"."""
    publish(dns_server)
    gate = await gate_factory(CONFIG)
    signed = BANK.sign(message("ceo@bank.test"))
    forged = signed.replace(b"d=bank.test", b"d=ban\\107.test", 1)
    assert forged != signed
    replies = await send(gate, "bank.test", forged)
    assert replies[-1].code == 250  # SPF passes for bank.test itself
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode()
    assert "dkim=pass" not in ar and "dkim=neutral" in ar, ar
    assert dns_server.count("sel._domainkey.bank.test") == 0


@pytest.mark.parametrize("name", [*LOOKALIKES, "ban\\107.test", "ban\\075.test"])
async def test_the_resolver_asks_nothing_for_a_name_with_no_a_label_form(
    dns_server: DnsServer, name: str
) -> None:
    publish(dns_server)
    r: Resolver = make_resolver(dns_server)
    for rdtype in ("TXT", "A"):
        assert (await r.lookup(name, rdtype)).status == "nxdomain"
        assert (await r.lookup(f"_dmarc.{name}", rdtype)).status == "nxdomain"
    assert bank_queries(dns_server) == {}
    assert ascii_domain(name) is None


async def test_the_resolver_asks_for_u_labels_by_their_a_labels(dns_server: DnsServer) -> None:
    dns_server.zone("xn--bcher-kva.test", {"_dmarc": {"TXT": "v=DMARC1; p=none"}})
    r = make_resolver(dns_server)
    answer = await r.lookup("_dmarc.b\u00fccher.test", "TXT")
    assert answer.texts == ["v=DMARC1; p=none"]
    assert dns_server.count("_dmarc.xn--bcher-kva.test", "TXT") == 1
    assert ascii_domain("B\u00fccher.TEST.") == "xn--bcher-kva.test"  # ASCII: any case
    assert ascii_domain("b\u00dccher.test") is None  # an upper-case U is no U-label
    assert ascii_domain("B\u00dcCHER.test", lenient=True) == "xn--bcher-kva.test"


async def test_a_link_is_looked_up_where_a_browser_goes(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    """The other way round, on purpose: a browser maps a link's host by UTS 46, so
    a link to the look-alike leads to bank.test, and that is what the URIBL asks."""
    publish(dns_server)
    gate = await gate_factory('[uribl]\nsites = ["dbl.test=127.0.1.[2..99]"]\n')
    body = "From: a@example.org\r\nSubject: log in\r\n\r\nhttps://ban\u212a.test/login\r\n"
    c, _ = await gate.client(source="127.0.0.5")
    replies = await c.mail("a@example.org", ["u@example.test"], body.encode())
    await c.close()
    assert replies[-1].code == 554 and "bank.test" in replies[-1].text
    assert dns_server.count("bank.test.dbl.test", "A") == 1


async def test_spf_macros_expand_client_names_without_mapping_them(
    dns_server: DnsServer,
) -> None:
    """pyspf lower-cases the names it looks up with Python's Unicode case mapping:
    a look-alike local part (%{l}) or HELO name (%{h}) must not become another's."""
    dns_server.zone(
        "macro.test",
        {
            "@": {"TXT": "v=spf1 exists:%{l}.users.macro.test -all"},
            "h": {"TXT": "v=spf1 exists:%{h}.helos.macro.test -all"},
            "ceok.users": {"A": "127.0.0.2"},  # ceok@macro.test may send from anywhere
            "bank.test.helos": {"A": "127.0.0.2"},  # so may HELO bank.test
        },
    )
    resolver = make_resolver(dns_server)
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        engine = SpfEngine(resolver, threads, budget=2.0)
        assert (await engine.check("127.0.0.9", "ceok@macro.test", "c.test")).result == "pass"
        kelvin = await engine.check("127.0.0.9", "ceo\u212a@macro.test", "c.test")
        assert kelvin.result == "fail", kelvin
        assert (await engine.check("127.0.0.9", "a@h.macro.test", "bank.test")).result == "pass"
        escaped = await engine.check("127.0.0.9", "a@h.macro.test", "ban\\107.test")
        assert escaped.result == "fail", escaped
    assert dns_server.count("ceok.users.macro.test") == 1
    assert dns_server.count("bank.test.helos.macro.test") == 1
