"""Domain lists over real sockets: the HELO name and the MAIL FROM domain."""

from __future__ import annotations

from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample

BODY = b"Subject: rhsbl\r\n\r\nhello\r\n"

LISTS = """
[rhsbl]
sites = ["dbl.test=127.0.1.[2..99]"]
"""


def publish_dbl(dns_server: DnsServer) -> None:
    dns_server.zone(
        "dbl.test",
        {
            "spammer.test": {"A": "127.0.1.2", "TXT": "https://dbl.test/lookup/spammer.test"},
            "test": {"A": "127.0.1.2"},  # RFC 5782 §5: TEST is listed
            "refused.test": {"A": "127.0.1.255"},  # "IP address queried": an error
            "rewritten.test": {"A": "127.0.0.1"},  # outside the filter
        },
    )


async def transaction(gate, helo: str, sender: str) -> list:
    c, _ = await gate.client(source="127.0.0.2")
    replies = await c.mail(sender, ["u@example.test"], BODY, helo=helo)
    await c.close()
    return replies


async def test_listed_helo_name(gate_factory: GateFactory, dns_server: DnsServer) -> None:
    publish_dbl(dns_server)
    gate = await gate_factory(LISTS)
    replies = await transaction(gate, "Spammer.Test", "a@example.org")
    assert replies[0].code == 250  # the HELO rejection waits for RCPT
    assert replies[2].code == 554
    assert replies[2].text == (
        "5.7.1 Service unavailable; HELO name [Spammer.Test] blocked using dbl.test; "
        "https://dbl.test/lookup/spammer.test"
    )


async def test_listed_sender_domain(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_dbl(dns_server)
    gate = await gate_factory(LISTS)
    replies = await transaction(gate, "clean.example.org", "a@spammer.test")
    assert replies[1].code == 250 and replies[2].code == 554
    assert "sender domain [spammer.test] blocked using dbl.test;" in replies[2].text
    replies = await transaction(gate, "clean.example.org", "a@clean.example.org")
    assert replies[-1].code == 250
    assert len(sink.messages) == 1


async def test_error_codes_and_odd_names_refuse_nothing(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_dbl(dns_server)
    gate = await gate_factory(LISTS)
    errors = sample("spamgate_dnsbl_results_total", zone="dbl.test", result="error")
    for helo, sender in (
        ("refused.test", "a@rewritten.test"),
        ("[127.0.0.2]", ""),  # an address literal and the null sender: nothing to ask
        ("localhost", "a@example.org"),
    ):
        replies = await transaction(gate, helo, sender)
        assert replies[-1].code == 250, (helo, sender)
    assert len(sink.messages) == 3
    assert sample("spamgate_dnsbl_results_total", zone="dbl.test", result="error") - errors == 2
    assert dns_server.count("localhost.dbl.test") == 0
    assert not any(q.startswith("[") for q, _ in dns_server.queries)


async def test_identities_can_be_switched_off(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_dbl(dns_server)
    gate = await gate_factory(LISTS + "helo = false\n")
    replies = await transaction(gate, "spammer.test", "a@example.org")
    assert replies[-1].code == 250
    assert dns_server.count("spammer.test.dbl.test") == 0
    replies = await transaction(gate, "example.org", "a@spammer.test")
    assert replies[2].code == 554


async def test_symbols_name_the_identity(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish_dbl(dns_server)
    gate = await gate_factory(
        """
        [rhsbl]
        symbols = { DBL = "dbl.test=127.0.1.[2..99]*3" }

        [scoring]
        tag = 1
        """
    )
    replies = await transaction(gate, "spammer.test", "a@spammer.test")
    assert replies[-1].code == 250
    headers = sink.messages[0].content.split(b"\r\n\r\n", 1)[0]
    assert b"X-Spam-Score: 6.0" in headers
    assert b"X-Spam-Symbols: DBL_FROM,DBL_HELO" in headers
