"""Links against domain lists, over real sockets, with a real DNS server on loopback."""

from __future__ import annotations

import resource
import time

from spamgate.checks.engines.links import Extractor, normal_host
from tests.kit.dnsserver import DnsServer
from tests.kit.mimemaker import b64, header, html_base64, plain
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample

LISTS = """
[uribl]
sites = ["dbl.test=127.0.1.[2..99]"]
symbols = { URIBL_GREY = "grey.test*2.5" }
ip_sites = ["ipbl.test=127.0.0.2"]
"""


def publish(dns_server: DnsServer) -> None:
    dns_server.zone(
        "dbl.test",
        {
            "listed.test": {"A": "127.0.1.2", "TXT": "https://dbl.test/lookup/listed.test"},
            "xn--bcher-kva.test": {"A": "127.0.1.2"},
            "refused.test": {"A": "127.0.1.255"},  # the list's "IP queried" code: an error
        },
    )
    dns_server.zone("grey.test", {"greyish.test": {"A": "127.0.0.2"}})
    dns_server.zone("ipbl.test", {"1.2.0.192": {"A": "127.0.0.2"}})


def asked(dns_server: DnsServer, zone: str) -> int:
    """A queries the server got for names under `zone`."""
    return sum(
        n
        for (name, rdtype), n in dns_server.queries.items()
        if rdtype == "A" and str(name).rstrip(".").endswith("." + zone)
    )


async def test_listed_link_in_base64_html_refused(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    listed = sample("spamgate_content_scans_total", check="uribl", result="listed")
    html = '<html><body><p>Offer!</p><a href="http://www.listed.test/buy">buy</a></body></html>'
    replies = await gate.send(html_base64(html))
    assert replies[-1].code == 554
    assert replies[-1].text == (
        "5.7.1 Message refused: link to domain [listed.test] blocked using dbl.test; "
        "https://dbl.test/lookup/listed.test"
    )
    assert sink.messages == []
    assert sample("spamgate_content_scans_total", check="uribl", result="listed") == listed + 1
    assert sample("spamgate_verdicts_total", stage="eod", check="uribl", action="reject") >= 1


async def test_obfuscated_links_still_found(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    disguises = [
        '<a href="HTTP://WWW.LiStEd.TeSt/x">mixed case</a>',
        '<a href="http://listed&#46;test/x">entity dot</a>',
        '<a href="http://listed&#x2E;test./x">hex entity, trailing dot</a>',
        '<a href="https://bücher.test/">IDN</a>',
        '<a href="https://\uff2c\uff29\uff33\uff34\uff25\uff24\uff0etest/">full-width</a>',
        '<a href="http://%6cisted.test/">percent-escaped host</a>',
        '<a href="http://user:pw@listed.test:8080/">user-info and port</a>',
        '<a href="https://go.example.org/r?u=https%3A%2F%2Flisted.test%2Fpath">redirect</a>',
        '<a href="mailto:sales@mail.listed.test">write</a>',
        "<p>just type listed.test/offer in your browser</p>",
    ]
    for n, markup in enumerate(disguises):
        replies = await gate.send(html_base64(f"<html><body>{markup}</body></html>", f"d{n}"))
        assert replies[-1].code == 554, markup
    # in a plain-text part, quoted-printable, too
    qp = (
        header("qp")
        + b"Content-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Transfer-Encoding: quoted-printable\r\n"
        + b"\r\nGo to http://www.listed=2Etest/offer=\r\n now\r\n"
    )
    assert (await gate.send(qp))[-1].code == 554
    assert sink.messages == []


async def test_unlisted_and_allowlisted_links_accepted(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    html = (
        '<html><body><a href="https://clean.test/a">a</a>'
        '<img src="https://www.w3.org/logo.png"><a href="https://shop.example.test/">ours</a>'
        "</body></html>"
    )
    replies = await gate.send(html_base64(html))
    assert replies[-1].code == 250
    assert len(sink.messages) == 1
    assert dns_server.count("clean.test.dbl.test", "A") == 1
    # the allowlist (defaults, and relay_domains) is never looked up
    assert dns_server.count("w3.org.dbl.test") == 0
    assert dns_server.count("example.test.dbl.test") == 0


async def test_error_codes_are_not_listings_and_symbols_score(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS + "\n[scoring]\ntag = 1.0\n")
    errors = sample("spamgate_dnsbl_results_total", zone="dbl.test", result="error")
    body = plain("see http://refused.test/ and http://greyish.test/")
    replies = await gate.send(body)
    assert replies[-1].code == 250
    assert sample("spamgate_dnsbl_results_total", zone="dbl.test", result="error") == errors + 1
    content = sink.messages[0].content
    assert b"X-Spam-Score: 2.5" in content
    assert b"X-Spam-Symbols: URIBL_GREY" in content


async def test_link_to_listed_address(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    replies = await gate.send(plain("login at http://192.0.2.1/bank now"))
    assert replies[-1].code == 554
    assert "link to address [192.0.2.1] blocked using ipbl.test" in replies[-1].text
    # the same address written as one number, as browsers accept it
    replies = await gate.send(plain("login at http://3221225985/bank now"))
    assert replies[-1].code == 554


async def test_monitor_mode_only_logs(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS, server={"mode": '"monitor"'})
    would = sample("spamgate_monitor_verdicts_total", stage="eod", check="uribl", action="reject")
    replies = await gate.send(plain("http://listed.test/"))
    assert replies[-1].code == 250 and len(sink.messages) == 1
    assert (
        sample("spamgate_monitor_verdicts_total", stage="eod", check="uribl", action="reject")
        == would + 1
    )


# -- bad input: bounded time and memory, a clear verdict --------------------------------


async def test_ten_thousand_links_bounded(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    links = "".join(f'<a href="http://d{n}.many.test/">{n}</a>\n' for n in range(10_000))
    started = time.monotonic()
    replies = await gate.send(html_base64(f"<html><body>{links}</body></html>"))
    assert replies[-1].code == 250
    assert time.monotonic() - started < 10
    # d0.many.test ... d9999.many.test: one registered domain, one lookup
    assert asked(dns_server, "dbl.test") == 1
    other = "".join(f'<a href="http://x{n}.test/">{n}</a>\n' for n in range(10_000))
    replies = await gate.send(html_base64(f"<html><body>{other}</body></html>", "other"))
    assert replies[-1].code == 250
    assert asked(dns_server, "dbl.test") == 1 + 20  # max_domains


async def test_distinct_domains_capped(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS + "max_domains = 5\n")
    # the listed one comes last in the text, but first in an href: looked up first
    text = " ".join(f"http://spam{n}.test/" for n in range(30))
    html = f'<html><body><p>{text}</p><a href="http://listed.test/">x</a></body></html>'
    replies = await gate.send(html_base64(html))
    assert replies[-1].code == 554
    assert asked(dns_server, "dbl.test") == 5


async def test_html_nested_5000_deep(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS + "part_size = 200000\n")
    deep = "<div>" * 5000 + '<a href="http://listed.test/">deep</a>' + "</div>" * 5000
    started = time.monotonic()
    replies = await gate.send(html_base64(f"<html><body>{deep}</body></html>"))
    assert replies[-1].code == 554  # found, at the bottom
    assert time.monotonic() - started < 5


async def test_malformed_base64(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    publish(dns_server)
    gate = await gate_factory(LISTS)
    good = b64(b'<a href="http://listed.test/">x</a>')
    for broken in (
        good[:-3] + b"!!*\r\n",  # garbage and a cut quantum at the end
        b"====\r\n" + good,  # padding first
        b"@@@@\r\n" + good + b"A\r\n",  # junk around, a lone trailing character
        b"PGEgaHJlZj0iaHR0cDovL2xpc3RlZC50ZXN0LyI+eDwvYT4=PGEg\r\n",  # data after padding
    ):
        body = (
            header("bad b64")
            + b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + broken
        )
        replies = await gate.send(body)
        # decoded as far as it goes: the link is still found
        assert replies[-1].code == 554, broken
    assert sink.messages == []


async def test_twenty_megabytes(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    """Spooled to disk, walked in a thread, only scan_size read: quick and small."""
    publish(dns_server)
    gate = await gate_factory(
        LISTS + "\n[limits]\nmessage_size = 30000000\n", resolver={"lifetime": "2.0"}
    )
    line = b"http://listed.test/ " + b"x" * 70 + b"\r\n"
    body = plain("hello") + line * (20_000_000 // len(line))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    replies = await gate.send(body)
    assert replies[-1].code == 554  # the first MB holds the links
    assert time.monotonic() - started < 20
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mb < 100, grown_mb


# -- the extractor on its own -------------------------------------------------------------


def test_normal_host() -> None:
    assert normal_host("WWW.Example.COM.") == ("www.example.com", None)
    assert normal_host("b\u00fccher.test")[0] == "xn--bcher-kva.test"
    assert normal_host("%65xample.test")[0] == "example.test"
    assert str(normal_host("0")[1]) == "0.0.0.0"
    assert normal_host("[2001:db8::1]")[0] == "2001:db8::1"
    assert normal_host("not a host") is None
    assert normal_host("single") is None


def test_bare_names_need_a_known_suffix_or_a_path() -> None:
    ex = Extractor(100)
    ex.text("invoice.pdf and notes.txt; visit example.com or shop.test/sale, mail bob@corp.test")
    hosts = {link.host for link in ex.found.links}
    assert hosts == {"example.com", "shop.test", "corp.test"}
