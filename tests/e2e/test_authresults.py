"""The Authentication-Results header (RFC 8601), read back from what the upstream
sink received and parsed with authres, field by field; forged ones removed."""

from __future__ import annotations

import io
import ipaddress
import logging
import re

import authres
import authres.dmarc
import pytest

from spamgate.app import loads
from spamgate.checks.dkim import DkimResults
from spamgate.checks.engines.dkimverify import SignatureResult
from spamgate.explain import explain
from spamgate.flow.authresults import authserv_id_of, build, claims
from spamgate.model import Client, Session, Transaction
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.postfix import PostfixInstance
from tests.kit.sink import Sink

from ..conftest import GateFactory, config_text
from .test_dmarc import CONFIG, DKIM, publish
from .test_postfix import delivered, gate_to, marker

PARSER = authres.FeatureContext(authres.dmarc)
OTHER = Signer("other.test", "s1")


def our_header(content: bytes) -> tuple[str, authres.AuthenticationResultsHeader]:
    """The first header field, which must be ours: (raw value, parsed)."""
    match = re.match(rb"Authentication-Results: ((?:[^\r]*\r\n)(?:[ \t][^\r]*\r\n)*)", content)
    assert match, content[:200]
    raw = match.group(1).decode()
    unfolded = re.sub(r"\r\n(?=[ \t])", "", raw).strip()
    return raw, PARSER.parse_value(unfolded)


def props(result) -> dict[str, str]:
    return {f"{p.type}.{p.name}": str(p.value) for p in result.properties}


def ar_fields(content: bytes) -> list[bytes]:
    head = content.split(b"\r\n\r\n")[0]
    return re.findall(rb"(?im)^authentication-results:[^\r]*(?:\r\n[ \t][^\r]*)*", head)


async def send(gate, mail_from: str, content: bytes, helo: str = "mx.client.test"):
    return (await gate.send(content, sender=mail_from, helo=helo))[-1]


@pytest.fixture
async def gate(gate_factory: GateFactory, dns_server: DnsServer):
    publish(dns_server)
    dns_server.zone("client.test", {"mx": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}})
    dns_server.zone("other.test", {OTHER.name: {"TXT": OTHER.record}})
    return await gate_factory(CONFIG.replace("helo = false", "helo = true"))


async def test_every_result_field_by_field(gate, sink: Sink) -> None:
    signed = OTHER.sign(DKIM.sign(message("alice@dkim.test")).replace(b"Hello", b"Hi"))
    signed = DKIM.sign(signed, identity="alice@dkim.test")
    assert (await send(gate, "bounce@esp.test", signed)).code == 250
    raw, header = our_header(sink.messages[0].content)
    assert header.authserv_id == "gate.test"
    assert raw.startswith("gate.test;\r\n\t")  # one result a line
    methods = [(r.method, r.result) for r in header.results]
    assert methods == [
        ("spf", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
    ]
    spf_mail, spf_helo, dkim_top, dkim_other, dkim_broken, dmarc = header.results
    assert props(spf_mail) == {"smtp.mailfrom": "bounce@esp.test"}
    assert props(spf_helo) == {"smtp.helo": "mx.client.test"}
    sig = re.search(rb"DKIM-Signature: (.*?)\r\n(?! )", signed, re.S).group(1)
    b = re.sub(rb"\s", b"", re.search(rb"\bb=([^;]*)", sig).group(1))[:8].decode()
    assert props(dkim_top) == {
        "header.d": "dkim.test",
        "header.i": "alice@dkim.test",
        "header.s": "sel",
        "header.a": "rsa-sha256",
        "header.b": b,
    }
    assert props(dkim_other)["header.d"] == "other.test"
    assert props(dkim_broken)["header.d"] == "dkim.test"
    assert props(dkim_broken)["header.i"] == "@dkim.test"
    assert "dkim=fail (body hash did not verify)" in raw
    assert props(dmarc) == {"header.from": "dkim.test"}
    assert "dmarc=pass (p=reject dis=none)" in raw
    # what the client sent follows, unchanged
    assert sink.messages[0].original == signed


async def test_dmarc_fail_and_temperror_are_reported(gate_factory, dns_server, sink) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG)
    assert (await send(gate, "bounce@esp.test", message("a@quarantine.test"))).code == 250
    raw, header = our_header(sink.messages[0].content)
    dmarc = header.results[-1]
    assert (dmarc.method, dmarc.result, props(dmarc)) == (
        "dmarc",
        "fail",
        {"header.from": "quarantine.test"},
    )
    assert "(p=quarantine dis=quarantine)" in raw
    assert [(r.method, r.result) for r in header.results[:2]] == [("spf", "pass"), ("dkim", "none")]
    assert (await send(gate, "bounce@esp.test", message("a@temp.test"))).code == 250
    _, header = our_header(sink.messages[1].content)
    assert (header.results[-1].result, props(header.results[-1])) == (
        "temperror",
        {"header.from": "temp.test"},
    )


async def test_nothing_checked_says_none(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    assert (await send(gate, "a@example.org", b"Subject: x\r\n\r\nhi\r\n")).code == 250
    raw, header = our_header(sink.messages[0].content)
    assert raw == "gate.test; none\r\n"
    assert header.results == []


async def test_forged_headers_are_removed_and_others_kept(
    gate, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    forged = (
        b"Authentication-Results: gate.test; dkim=pass header.d=paypal.test\r\n"
        b"Authentication-Results: (looks innocent) GATE.Test ;\r\n\tdmarc=pass header.from=x\r\n"
        b'authentication-results: "gate.test"; spf=pass\r\n'
        b"Authentication-Results: mx.other.test; spf=fail smtp.mailfrom=a@spf.test\r\n"
        b"Authentication-Results: gate.test.evil.test; dkim=pass\r\n"
    )
    content = forged + message("alice@spf.test")
    assert (await send(gate, "alice@spf.test", content)).code == 250
    got = sink.messages[0].content
    fields = ar_fields(got)
    assert len(fields) == 3  # ours, and the two of other authserv-ids
    assert fields[1] == b"Authentication-Results: mx.other.test; spf=fail smtp.mailfrom=a@spf.test"
    assert fields[2] == b"Authentication-Results: gate.test.evil.test; dkim=pass"
    assert b"paypal" not in got and b"looks innocent" not in got
    assert got.endswith(message("alice@spf.test"))
    assert "removed 3 Authentication-Results header field(s) claiming to be ours" in caplog.text


async def test_added_in_monitor_mode_and_to_held_messages(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, tmp_path
) -> None:
    publish(dns_server)
    gate = await gate_factory(CONFIG, server={"mode": '"monitor"'})
    forged = b"Authentication-Results: gate.test; dmarc=pass\r\n"
    assert (await send(gate, "bounce@esp.test", forged + message("a@reject.test"))).code == 250
    _, header = our_header(sink.messages[0].content)
    assert (header.results[-1].method, header.results[-1].result) == ("dmarc", "fail")
    assert len(ar_fields(sink.messages[0].content)) == 1
    held = tmp_path / "held"
    gate = await gate_factory(CONFIG + 'p_reject = "hold"\n', server={"quarantine": f'"{held}"'})
    assert (await send(gate, "bounce@esp.test", forged + message("a@reject.test"))).code == 250
    [path] = list((held / "new").iterdir())
    content = path.read_bytes().split(b"\r\n", 2)[2]  # after Return-Path and Received
    content = re.sub(rb"\A(?:[ \t].*\r\n)*", b"", content)  # Received's continuation lines
    _, header = our_header(content)
    assert header.results[-1].result == "fail"
    assert len(ar_fields(content)) == 1


async def test_sender_chosen_values_cannot_pose_as_results(gate, sink: Sink) -> None:
    sender = '"x;dkim=pass header.d=paypal.test"@spf.test'
    assert (await send(gate, sender, message("a@spf.test"))).code == 250
    raw, header = our_header(sink.messages[0].content)
    assert [(r.method, r.result) for r in header.results] == [
        ("spf", "pass"),
        ("spf", "pass"),
        ("dkim", "none"),
        ("dmarc", "pass"),
    ]
    assert props(header.results[0]) == {"smtp.mailfrom": "@spf.test"}
    assert "paypal" not in raw


@pytest.mark.parametrize(
    ("value", "ours"),
    [
        ("gate.test; none", True),
        ("GATE.TEST; spf=pass", True),
        ("  (a comment (nested)) gate.test ; spf=pass", True),
        ('"gate.test"; spf=pass', True),
        ("gate.test 1; spf=pass", True),
        ("gate.test.example; spf=pass", False),
        ("other.test; spf=pass (gate.test)", False),
        ("; spf=pass", False),
        ("(unclosed gate.test; spf=pass", False),
        # What other readers make of it (found by probing): a domain with its root dot, a
        # value cut at a NUL (Postfix cuts the field there) or at a character no
        # token holds, a pipeline that strips control characters, RFC 2047
        # decoding (Python's email package, for any unknown field), Unicode
        # compatibility forms and case.
        ("gate.test.; dkim=pass", True),
        ("gate.test..; dkim=pass", True),
        ('"gate.test."; dkim=pass', True),
        ("gate.test\x00; dkim=pass", True),
        ("gate.test\x00junk; dkim=pass", True),
        ("\x00gate.test; dkim=pass", True),
        ("ga\x00te.test; dkim=pass", True),
        ("gate.test\x01; dkim=pass", True),
        ("gate.test\x7f; dkim=pass", True),
        ("gate.test/x; dkim=pass", True),
        ("gate.test@x; dkim=pass", True),
        ("=?utf-8?q?gate.test?=; dkim=pass", True),
        ("=?utf-8?b?Z2F0ZS50ZXN0?= ; dkim=pass", True),
        ("\uff47\uff41\uff54\uff45\uff0e\uff54\uff45\uff53\uff54; dkim=pass", True),
        ("GATE.TEST.; dkim=pass", True),
        ("gate.test-x; dkim=pass", False),
        ("gate.testx; dkim=pass", False),
        ("=?utf-8?q?other.test?=; dkim=pass", False),
    ],
)
def test_whose_header_it_is(value: str, ours: bool) -> None:
    assert claims(value, "gate.test") is ours
    assert claims(value, "Gate.Test") is ours


# A field claiming our authserv-id, in the spellings found by probing.
SPELLINGS = [
    b"Authentication-Results : gate.test; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results\t: gate.test; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results \t : gate.test; dkim=pass header.d=paypal.test\r\n",
    b"AUTHENTICATION-RESULTS: gate.test; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results: gate.test.; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results: gate.test\x00; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results: gate.test\x01; dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results:gate.test;dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results:\r\n gate.test;\r\n dkim=pass header.d=paypal.test\r\n",
    b"Authentication-Results: =?us-ascii?q?gate.test?=; dkim=pass header.d=paypal.test\r\n",
]


@pytest.mark.parametrize("forged", SPELLINGS)
async def test_forged_headers_in_other_spellings_are_removed(gate, sink: Sink, forged) -> None:
    content = b"X-Before: 1\r\n" + forged + message("alice@spf.test")
    assert (await send(gate, "alice@spf.test", content)).code == 250
    got = sink.messages[0].content
    assert b"paypal" not in got
    assert got.endswith(b"\r\nX-Before: 1\r\n" + message("alice@spf.test"))


async def test_forged_spellings_never_reach_postfix_as_ours(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    """Postfix reads "Name :" as a field and writes it as "Name:", and cuts a field
    at a NUL: whatever it makes of them, one field claims gate.test, ours."""
    gate = await gate_to(gate_factory, postfix)
    mark = marker()
    content = f"Subject: {mark}\r\n".encode() + b"".join(SPELLINGS) + b"\r\nbody\r\n"
    c, _ = await gate.client(source="127.0.0.5")
    assert (await c.mail("a@example.org", ["u@example.test"], content))[-1].code == 250
    msg = await delivered(postfix, mark)
    fields = msg.get_all("Authentication-Results")
    assert len(fields) == 1 and claims(fields[0], "gate.test")
    assert "paypal" not in msg.as_string()


def test_authserv_id_forms() -> None:
    assert authserv_id_of('"a\\"b"; none') == 'a"b'
    assert authserv_id_of("mx.example.org;none") == "mx.example.org"


async def test_explain_shows_the_header(dns_server: DnsServer, tmp_path) -> None:
    config = loads(config_text(None, dns=dns_server), str(tmp_path / "c.toml"))
    out = io.StringIO()
    code = await explain(
        config,
        client_ip="192.0.2.9",
        client_name="mx.example.org",
        helo="mx.example.org",
        sender="a@example.org",
        recipients=["u@example.test"],
        message=b"Authentication-Results: gate.test; spf=pass\r\nSubject: x\r\n\r\nhi\r\n",
        out=out,
    )
    assert code == 0
    text = out.getvalue()
    assert "added header: Authentication-Results: gate.test; none" in text
    assert "removed 1 forged Authentication-Results field(s)" in text


def test_long_results_are_folded_and_unfold_exactly() -> None:
    sig = SignatureResult(
        "neutral",
        "a-rather-long-subdomain.of-an-organisation.example",
        "s" * 60 + "." + "t" * 60,
        '"quoted local"@a-rather-long-subdomain.of-an-organisation.example',
        "rsa-sha256",
        "abc/+DEF",
        "a reason with words: " + "word " * 40,
    )
    txn = Transaction("a@example.org")
    txn.results.put(DkimResults((sig,)))
    session = Session("s", Client(ipaddress.ip_address("192.0.2.1"), 25))
    value = build("gate.test", session, txn)
    # folded at spaces: a line is short, or one word that cannot be broken
    assert all(len(line) <= 78 or " " not in line.strip() for line in value.split("\r\n"))
    parsed = PARSER.parse_value(re.sub(r"\r\n(?=[ \t])", "", value))
    [dkim] = parsed.results
    assert props(dkim) == {
        "header.d": sig.domain,
        "header.i": "@a-rather-long-subdomain.of-an-organisation.example",
        "header.s": sig.selector,
        "header.a": "rsa-sha256",
        "header.b": "abc/+DEF",
    }
    unfolded = re.sub(r"\r\n(?=[ \t])", "", value)
    assert f"({sig.reason[:200].strip()})" in unfolded  # comments are cut at 200
