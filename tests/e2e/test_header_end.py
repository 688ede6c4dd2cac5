"""Where the header section ends: exactly where Postfix ends it, for every reader.

Postfix's cleanup ends the header section at the empty line, or at the first
line that is neither a header field (is_header(): a name of printable ASCII but
":", then optional white space, then ":") nor the continuation of one; that
line and the rest are body, after an empty line Postfix puts in. A checker
that read on past such a line would judge a `From:` that Postfix delivers as
body (and see two From fields where Postfix sees one).

Each case below is checked three ways: spamgate's parser (`Message`, in memory
and spooled, fed in pieces), the checks that read header fields through the
real proxy socket (DMARC's From, header rules, Authentication-Results removal,
DKIM, attachments, body rules), and against a real Postfix, which shows what it
delivered as header fields next to what spamgate's header rules saw.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from spamgate.message import Message, scan_header
from spamgate.spool import Spool
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.mimemaker import b64
from tests.kit.postfix import PostfixInstance
from tests.kit.sink import Sink

from ..conftest import GateFactory
from .test_postfix import gate_to

SUBJECT = b"Subject: quarterly numbers\r\n"
FROM = b"From: CEO <ceo@bank.test>\r\n"
EVIL = b"From: Mallory <m@evil.test>\r\n"

# (name, content, the header lines Postfix delivers, as "Name: value")
CASES: list[tuple[str, bytes, list[str]]] = [
    (
        "plain",
        FROM + SUBJECT + b"\r\nbody\r\n",
        ["From: CEO <ceo@bank.test>", "Subject: quarterly numbers"],
    ),
    (
        "non-header line before From",
        SUBJECT + b"This line is no header field\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "second From below a non-header line",
        FROM + SUBJECT + b"not a header\r\n" + EVIL + b"\r\nbody\r\n",
        ["From: CEO <ceo@bank.test>", "Subject: quarterly numbers"],
    ),
    (
        "white space before the colon",
        b"Subject : quarterly numbers\r\nFrom\t: CEO <ceo@bank.test>\r\n\r\nbody\r\n",
        ["Subject: quarterly numbers", "From: CEO <ceo@bank.test>"],
    ),
    (
        "empty name",
        SUBJECT + b": no name\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "one-character name",
        SUBJECT + b"-: a dash\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers", "-: a dash", "From: CEO <ceo@bank.test>"],
    ),
    (
        "8-bit byte in a name",
        SUBJECT + "X-\u00dcber: y\r\n".encode() + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "space inside a name",
        SUBJECT + b"X Y: z\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "DEL in a name",
        SUBJECT + b"X-\x7fDel: y\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "NUL in a name",
        SUBJECT + b"X-\x00Nul: y\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "a line without a colon",
        SUBJECT + b"NoColonHere\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "continuation of a non-header line",
        SUBJECT + b"not a header\r\n continued\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers"],
    ),
    (
        "first line no header field",
        b"Hello there,\r\n" + FROM + SUBJECT + b"\r\nbody\r\n",
        [],
    ),
    (
        "mbox From_ line first",
        b"From ceo@bank.test Mon Jan  1 00:00:00 2024\r\n" + FROM + SUBJECT + b"\r\nbody\r\n",
        [],
    ),
    (
        "quoted >From_ line first",
        b">From ceo@bank.test Mon Jan  1 00:00:00 2024\r\n" + FROM + b"\r\nbody\r\n",
        [],
    ),
    (
        "empty line first",
        b"\r\n" + FROM + SUBJECT + b"\r\nbody\r\n",
        [],
    ),
    (
        "white space first",
        b" folded onto nothing\r\n" + FROM + b"\r\nbody\r\n",
        [],
    ),
    (
        "folded fields, no body",
        b"Subject: quarterly\r\n numbers\r\n" + FROM,
        ["Subject: quarterly numbers", "From: CEO <ceo@bank.test>"],
    ),
]

# With bare_newline = "normalize", a bare CR is a space before anything reads it
# (and before Postfix gets it), so a CR at the end of a header line or on a line
# of its own is white space in both views.
CR_CASES: list[tuple[str, bytes, list[str]]] = [
    (
        "header line ending in CR",
        b"Subject: quarterly numbers\r\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers", "From: CEO <ceo@bank.test>"],
    ),
    (
        "header block ending in a CR line",
        SUBJECT + b"\r\r\n" + FROM + b"\r\nbody\r\n",
        ["Subject: quarterly numbers", "From: CEO <ceo@bank.test>"],
    ),
]


def seen(message: Message) -> list[str]:
    return [f"{h.name}: {h.unfolded()}" for h in message.headers]


@pytest.mark.parametrize(("name", "content", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_the_parser_ends_the_header_section_where_postfix_does(
    name: str, content: bytes, expected: list[str], tmp_path
) -> None:
    assert seen(Message(content)) == expected
    # The same when it arrives in pieces and is spooled to disk.
    for piece in (1, 7, len(content)):
        spool = Spool(threshold=0, directory=str(tmp_path))
        for i in range(0, len(content), piece):
            await spool.write(content[i : i + piece])
        spooled = await spool.finish()
        try:
            assert seen(spooled) == expected, piece
            assert spooled.body_offset == Message(content).body_offset
            assert spooled.header_bytes == Message(content).header_bytes
        finally:
            spooled.close()


def test_what_goes_upstream_ends_the_header_section_there_too() -> None:
    content = SUBJECT + b"not a header\r\n" + FROM + b"\r\nbody\r\n"
    out = Message(content).relayed(b"X-Added: 1\r\n").to_bytes()
    assert out == b"X-Added: 1\r\n" + SUBJECT + b"\r\nnot a header\r\n" + FROM + b"\r\nbody\r\n"
    assert Message(content).relayed(b"").size == len(out) - len(b"X-Added: 1\r\n")
    # Postfix's form, for parsers of our own choosing: names normalised, one empty line.
    msg = Message(b"Subject :  x\r\nFrom\t:y\r\n z\r\nnot one\r\nTo: u\r\n\r\nbody\r\n")
    assert msg.header_section == b"Subject:  x\r\nFrom:y\r\n z\r\n\r\n"
    assert msg.body == b"not one\r\nTo: u\r\n\r\nbody\r\n"


def test_scan_header_resumes_at_the_undecided_line() -> None:
    data = SUBJECT + b"From: a@b"
    end, resume = scan_header(data)
    assert end is None and resume == len(SUBJECT)
    assert scan_header(data + b"\r\nnope\r\n", resume) == (len(data) + 2, len(data) + 2)


# -- the checks, through the proxy -----------------------------------------------------


async def send(gate, content: bytes, sender: str = "a@example.org") -> list:
    return await gate.send(content, sender=sender, source="127.0.0.5", helo="mx.client.test")


DMARC = """
[spf]
enabled = true
helo = false

[dkim]
enabled = true

[dmarc]
enabled = true
"""


async def test_dmarc_judges_the_from_postfix_delivers(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    dns_server.zone(
        "bank.test", {"@": {"TXT": "v=spf1 -all"}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}}
    )
    dns_server.zone(
        "example.org",
        {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}},
    )
    gate = await gate_factory(DMARC)
    # A From that Postfix delivers as body is no From: the message has none.
    content = SUBJECT + b"This line is no header field\r\n" + FROM + b"\r\nbody\r\n"
    reply = (await send(gate, content))[-1]
    assert (reply.code, reply.text) == (
        550,
        "5.7.1 Message refused: no From header field; RFC 5322 requires exactly one From "
        "address with a domain",
    )
    # Two From fields to a reader that reads on; one to Postfix, and it is judged.
    content = b"From: a@example.org\r\n" + SUBJECT + b"not a header\r\n" + FROM + b"\r\nbody\r\n"
    assert (await send(gate, content))[-1].code == 250
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode()
    assert "dmarc=pass" in ar and "header.from=example.org" in ar, ar
    assert dns_server.count("_dmarc.bank.test") == 0


async def test_header_rules_read_the_header_postfix_delivers(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    (tmp_path / "header.regexp").write_text(
        "/^From:.*@bank\\.test/ REJECT no mail from the bank here\n"
    )
    (tmp_path / "body.regexp").write_text("/^From:.*@bank\\.test/ SCORE 0.5 BANK_IN_BODY\n")
    gate = await gate_factory(
        '[rules]\nheader = ["regexp:header.regexp"]\nbody = ["regexp:body.regexp"]\n'
        "[scoring]\ntag = 0.1\n"
    )
    assert (await send(gate, FROM + b"\r\nbody\r\n"))[-1].code == 550
    content = SUBJECT + b"This line is no header field\r\n" + FROM + b"\r\nbody\r\n"
    assert (await send(gate, content))[-1].code == 250
    delivered = sink.messages[-1].content
    assert b"X-Spam-Symbols: BANK_IN_BODY" in delivered  # body rules read it as body
    head, _, body = delivered.partition(b"\r\n\r\n")
    assert b"ceo@bank.test" not in head and body.startswith(b"This line is no header field")


async def test_only_header_fields_claiming_our_id_are_removed(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gate = await gate_factory()
    forged = b"Authentication-Results: gate.test; dkim=pass header.d=bank.test\r\n"
    content = forged + SUBJECT + b"not a header\r\n" + forged + b"\r\nbody\r\n"
    assert (await send(gate, content))[-1].code == 250
    delivered = sink.messages[-1].original
    # The first is a header field and goes; the second is body, and stays body.
    assert delivered == SUBJECT + b"\r\nnot a header\r\n" + forged + b"\r\nbody\r\n"
    assert "removed 1 Authentication-Results header field(s)" in caplog.text


async def test_dkim_verifies_the_header_postfix_delivers(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink
) -> None:
    signer = Signer("bank.test", "sel")
    dns_server.zone("bank.test", {"@": {"TXT": "v=spf1 -all"}, signer.name: {"TXT": signer.record}})
    gate = await gate_factory("[dkim]\nenabled = true\n")
    signed = signer.sign(message("ceo@bank.test"))
    # Below a line that ends the header section, a signature is body: not verified.
    content = SUBJECT + b"not a header\r\n" + signed
    assert (await send(gate, content))[-1].code == 250
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode()
    assert "dkim=none" in ar, ar
    assert dns_server.count("sel._domainkey.bank.test") == 0
    # Where it is a header field it verifies, with white space before a colon,
    # which Postfix normalises (and relaxed canonicalisation ignores).
    spaced = signed.replace(b"\r\nSubject: ", b"\r\nSubject : ", 1)
    assert spaced != signed
    assert (await send(gate, spaced))[-1].code == 250
    ar = sink.messages[-1].content.split(b"\r\n\r\n", 1)[0].decode()
    assert "dkim=pass" in ar, ar


@pytest.mark.parametrize(
    ("top", "part"),
    [
        (b"Content-Type", b"Content-Disposition"),
        (b"Content-Type ", b"Content-Disposition"),  # Postfix: "Content-Type:"
        (b"Content-Type", b"Content-Disposition\t"),  # in a part, too
    ],
)
async def test_attachments_are_found_in_the_structure_postfix_delivers(
    gate_factory: GateFactory, sink: Sink, top: bytes, part: bytes
) -> None:
    """A field name with white space before its colon is a field to Postfix, which
    delivers it as "Name:", and so to the reader's program: the `email` package,
    which would not read it, is given the fields as Postfix writes them."""
    gate = await gate_factory("[attachments]\nenabled = true\n")
    content = (
        SUBJECT
        + top
        + b': multipart/mixed; boundary="=_mix"\r\n\r\n'
        + b"--=_mix\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        + b"--=_mix\r\nContent-Type: application/octet-stream\r\n"
        + part
        + b': attachment; filename="setup.exe"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(b"MZ\x90\x00" + b"\x00" * 500)
        + b"--=_mix--\r\n"
    )
    reply = (await send(gate, content))[-1]
    assert reply.code == 554 and "setup.exe" in reply.text, reply


# -- against Postfix ---------------------------------------------------------------------

SEE_ALL = "/^(.*)$/ PREPEND X-Seen: $1\n"


def postfix_header(delivered: bytes, ours: set[str]) -> tuple[list[str], list[str]]:
    """(the client's header fields as Postfix delivered them, what spamgate saw):
    fields of Postfix's own (Return-Path, Delivered-To, Received) and spamgate's
    (Authentication-Results, X-Seen) are taken apart from the client's."""
    head = delivered.split(b"\n\n", 1)[0].decode("utf-8", "surrogateescape")
    fields: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    client = [f"{n}: {v.strip()}" for n, v in fields if n.lower() not in ours]
    saw = [v.strip() for n, v in fields if n == "X-Seen"]
    return client, saw


# Fields Postfix adds (none of the cases has a Date or Message-ID of its own) and ours.
OURS = {
    "return-path",
    "delivered-to",
    "x-original-to",
    "received",
    "date",
    "message-id",
    "authentication-results",
}


async def test_spamgate_sees_the_header_fields_postfix_delivers(
    gate_factory: GateFactory, postfix: PostfixInstance, tmp_path
) -> None:
    """For each case, the header lines spamgate's header rules read (each one
    prepended as X-Seen) are the header fields Postfix delivered, in order."""
    (tmp_path / "seen.regexp").write_text(SEE_ALL)
    rules = '[rules]\nheader = ["regexp:seen.regexp"]\n'
    plain = await gate_to(gate_factory, postfix, rules)
    normalize = await gate_to(gate_factory, postfix, rules + '[smtp]\nbare_newline = "normalize"\n')
    for gate, cases in ((plain, CASES), (normalize, CR_CASES)):
        for name, content, expected in cases:
            mark = uuid.uuid4().hex
            c, _ = await gate.client(source="127.0.0.5")
            body = content + f"mark {mark}\r\n".encode()
            replies = await c.mail("a@example.org", ["u@example.test"], body)
            await c.close()
            assert replies[-1].code == 250, (name, replies[-1])
            raw = await asyncio.to_thread(postfix.wait_delivered, mark.encode())
            client, saw = postfix_header(raw, OURS | {"x-seen"})
            assert saw == expected, (name, raw)
            # Postfix adds a From field (the envelope sender) to a message whose
            # header section has none: the proof that it saw none either.
            if not any(line.startswith("From:") for line in expected):
                expected = [*expected, "From: a@example.org"]
            assert client == expected, (name, raw)
