"""Property-based fuzzing of whole SMTP sessions over a real socket (hypothesis).

Three kinds of session, each on its own listener of one spamgate (fuzzkit.py):
plain SMTP from inside or outside mynetworks, sessions behind a PROXY header
(valid v1/v2, LOCAL, and broken headers), and STARTTLS + AUTH passthrough from
outside mynetworks. Messages are plain text or generated MIME (multipart, base64
and quoted-printable, broken and not, with links and attachment names), read by
header and body rules, SPF, DKIM and DMARC, and the content checks that need no
daemon (links against a list on the test DNS server, attachments).

A short run is part of the normal suite. The long run, with a JSON line of
figures per kind (sessions, messages accepted, crashes):

    FUZZ_EXAMPLES=3400 FUZZ_REPORT=/tmp/fuzz.jsonl \\
        python -m pytest -q tests/e2e/test_fuzz.py

Every failure hypothesis finds is shrunk to a small session: add it to
tests/corpus/ so it is replayed forever after.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import os
import pathlib
import re
import socket
import struct
import time

import prometheus_client
import pytest
from aiosmtpd.proxy_protocol import V2_SIGNATURE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamgate import metrics

from .fuzzkit import (
    ACCOUNT,
    Harness,
    auth_plain,
    check_commands,
    check_milter_responses,
    check_upstream,
    may_relay,
    no_error_logged,
    run_milter,
    run_session,
    xclient_addr,
)

CORPUS = pathlib.Path(__file__).parents[1] / "corpus"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def harness():
    h = Harness().start()
    yield h
    h.stop()


def fuzz_settings(default: int):
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- commands -----------------------------------------------------------------------

ENDINGS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b""])
JUNK = st.binary(min_size=0, max_size=40)
TEXT = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=0, max_size=40
).map(lambda s: s.encode("utf-8", "surrogatepass"))
LONG = st.integers(min_value=500, max_value=5000).map(lambda n: b"A" * n)
ADDRS = st.sampled_from(
    [
        b"<a@example.org>",
        b"<>",
        b"<u@example.test>",
        b"<U@EXAMPLE.TEST>",
        b"<x@elsewhere.test>",
        b"<x@example.test.elsewhere.test>",
        b"<x%elsewhere.test@example.test>",
        b"<x@elsewhere.test@example.test>",
        b"<@example.test:x@elsewhere.test>",
        b"<postmaster>",
        b"<\xc3\xbc@example.test>",
        b'<"a b"@example.test>',
        b'<"a>b"@example.test>',
        b"<@r1,@r2:u@example.test>",
        b"a@example.org",
        b"<a@example.org",
        b"<a@>",
        b"<<a@b>>",
        b"<a@[127.0.0.1]>",
        b"<a@[IPv6:::1]>",
        b"<a\x00b@example.test>",
        b"<a\tb@example.test>",
        # sender-specified routing and look-alike domains
        b"<x!elsewhere.test@example.test>",
        b'<"x@elsewhere.test"@example.test>',
        b'<"x%elsewhere.test"@bank.test>',
        b"<@bank.test:x%elsewhere.test@example.test>",
        "<u@ban\u212a.test>".encode(),
        "<u@BAN\u212a.TEST>".encode(),
        "<u@\uff42ank.test>".encode(),
        b"<u@Bank.Test.>",
    ]
)
PARAMS = st.lists(
    st.sampled_from(
        [
            b"SIZE=100",
            b"SIZE=999999999",
            b"SIZE=x",
            b"SIZE=",
            b"SIZE=-1",
            b"SIZE=1 SIZE=2",
            b"BODY=8BITMIME",
            b"BODY=BINARYMIME",
            b"BODY=",
            b"SMTPUTF8",
            b"SMTPUTF8=yes",
            b"RET=HDRS",
            b"RET=FULL RET=HDRS",
            b"ENVID=a+2Bb",
            b"ENVID=a+ZZ",
            b"ENVID=\x01",
            b"NOTIFY=NEVER",
            b"NOTIFY=SUCCESS,DELAY",
            b"NOTIFY=NEVER,SUCCESS",
            b"ORCPT=rfc822;u@example.test",
            b"ORCPT=rfc822;a+ZZ",
            b"ORCPT=x",
            b"AUTH=<>",
            b"XCLIENT=ADDR=1.2.3.4",
            b"X=Y=Z",
            b"=",
            b"FOO",
            b"SIZE=1\tBODY=7BIT",
            b"SIZE=" + b"9" * 300,
            b"\xc3\xbc=1",
            # Unicode that case mapping or str.isdigit() take for ASCII
            "SIZE=\u0661\u0662".encode(),
            "SIZE=\uff11\uff12".encode(),
            "SIZE=\u00b2".encode(),
            "BODY=8b\u0131tmime".encode(),
            "RET=HDR\u017f".encode(),
            "ENVID=\u00fc".encode(),
            "NOTIFY=\u017fuccess".encode(),
            "NOTIFY=DELAY,\u017fUCCESS".encode(),
            "ORCPT=rfc822;\u00fc@example.test".encode(),
            "ORCPT=utf-8;\u00fc@example.test".encode(),
            "ORCPT=rfc\u0131822;a@example.test".encode(),
            "\u017fIZE=1".encode(),
        ]
    ),
    max_size=3,
).map(lambda ps: b"".join(b" " + p for p in ps))
HELOS = st.sampled_from(
    [
        b"client.test",
        b"x ADDR=10.0.0.1",
        b"a=b",
        b"[127.0.0.1]",
        b"gate.test",
        b"",
        b"a+b",
        b"\xff\xfe",
        b"x\tNAME=evil",
        b"x\x00y",
        b"[IPv6:::1]",
        b"a" * 300,
    ]
)
AUTHS = st.sampled_from(
    [
        b"AUTH PLAIN " + auth_plain(*ACCOUNT),
        b"AUTH PLAIN " + auth_plain(ACCOUNT[0], "wrong"),
        b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret\r\nMAIL FROM:<x@y>"),
        b"AUTH PLAIN =",
        b"AUTH PLAIN not*base64",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH LOGIN " + base64.b64encode(b"alice"),
        b"AUTH CRAM-MD5",
        b"AUTH",
        b"*",
        base64.b64encode(b"alice"),
        base64.b64encode(b"s3cret"),
        base64.b64encode(b"x\r\nRCPT TO:<x@elsewhere.test>"),
        b"A" * 13000,
        b"A" * 70_000,  # beyond the read buffer
    ]
)


@st.composite
def command(draw) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "helo",
                "mail",
                "rcpt",
                "simple",
                "junk",
                "long",
                "endless",
                "lookalike",
                "auth",
                "xclient",
            ]
        )
    )
    end = draw(ENDINGS)
    if kind == "helo":
        line = draw(st.sampled_from([b"EHLO ", b"HELO ", b"ehlo ", b"EHLO"])) + draw(HELOS)
    elif kind == "mail":
        line = draw(st.sampled_from([b"MAIL FROM:", b"mail from: ", b"MAIL FROM "])) + draw(ADDRS)
        line += draw(PARAMS)
    elif kind == "rcpt":
        line = draw(st.sampled_from([b"RCPT TO:", b"rcpt to: "])) + draw(ADDRS) + draw(PARAMS)
    elif kind == "simple":
        line = draw(
            st.sampled_from(
                [
                    b"RSET",
                    b"NOOP",
                    b"DATA",
                    b"VRFY root",
                    b"HELP",
                    b"STARTTLS",
                    b"BDAT 10 LAST",
                    b"ETRN x",
                    b"EXPN all",
                    b"GET / HTTP/1.0",
                    b"",
                    b"RSET extra",
                    b"QUIT",
                    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2",
                    b"XFORWARD ADDR=10.0.0.1",
                ]
            )
        )
    elif kind == "junk":
        line = draw(st.one_of(JUNK, TEXT))
    elif kind == "long":
        line = b"MAIL FROM:<" + draw(LONG) + b"@example.org>"
    elif kind == "endless":  # beyond the 64 KiB read buffer; often without an end
        line = draw(st.sampled_from([b"MAIL FROM:<", b"NOOP ", b"AUTH PLAIN "])) + b"A" * 70_000
        if draw(st.booleans()):
            return line
    elif kind == "lookalike":  # verbs and mechanisms Python would upper-case to ASCII
        line = draw(
            st.sampled_from(
                [
                    "ma\u0131l FROM:<a@example.org>",
                    "RCPT TO:<u@example.test>",
                    "rcpt to:<u@example.test>",
                    "AUTH PLA\u0131N " + auth_plain(*ACCOUNT).decode(),
                    "\u017fTARTTLS",
                    "qu\u0131t",
                ]
            )
        ).encode()
    elif kind == "auth":
        line = draw(AUTHS)
    else:
        line = b"XCLIENT ADDR=10.1.2.3 NAME=evil"
    return line + end


# -- messages -----------------------------------------------------------------------

BODY_PIECES = st.sampled_from(
    [b"hello\r\n", b"Hello, world.\r\n", b"\r\n", b"-- \r\nsig\r\n"] * 3
    + [
        b"hello\r\n",
        b".leading dot\r\n",
        b"..\r\n",
        b"bare\nLF\r\n",
        b"bare\rCR\r\n",
        b"x\n.\nMAIL FROM:<evil@x.test>\r\n",
        b"y\r\n.\rRCPT TO:<evil@x.test>\r\n",
        b"z\r.\r\nDATA\r\n",
        b"\r\n.\r\r\n",
        b"Subject: =?utf-8?b?w7w=?=\r\n",
        b"Content-Transfer-Encoding: base64\r\n\r\n!!notbase64!!\r\n",
        b"A" * 1200 + b"\r\n",
        b"\xff\xfe\x00binary\r\n",
        b"MAIL FROM:<smuggled@x.test>\r\n",
        b"viagra prepend-me\r\n",
        b"a" * 40 + b"!\r\n",
        b"\r\n",
    ]
)
WORDS = st.sampled_from(
    [b"hello", b"world", b"text", b"mail"] * 3
    + [
        b"hello",
        b"reject-me",
        b"prepend-me",
        b"viagra",
        b"a" * 30 + b"!",
        b"\x00\x1b\x07",
        b"\r\nX-Injected: yes\r\n",
        b"\nX-Injected: 0\n",
        b"\xc3\xbc\xe2\x82\xac",
        b"\xff\xfe",
        b"=?utf-8?b?eA0KWC1JbmplY3RlZDogeWVz?=",
        b"--b1",
        b".",
        # links, for [uribl]: listed (dbl.test lists listed.test) and malformed
        b'<a href="HTTP://Listed&#46;Test/x">',
        b"www.listed.test/offer",
        b"https://go.test/r?u=http%3A%2F%2Flisted.test%2F",
        b'<img src="//[::1]:x/">',
        b"http://%zz%.test/ mailto:@ https://1.2.3.4.5/ http://0x7f.1/",
        b"<a href=" + b"<div>" * 50,
    ]
)
SUBJECTS = st.sampled_from(
    [
        b"fuzz",
        b"reject-me",
        b"=?utf-8?b?eA0KWC1JbmplY3RlZDogeWVz?=",
        b"a\x00b\x1bc",
        b"x" * 900,
        b"fold\r\n\tX-Injected: yes",
        b"\xc3\xbc",
    ]
)


FORGED = st.sampled_from(
    [
        b"Authentication-Results: gate.test; dkim=pass header.d=paypal.test\r\n",
        b"Authentication-Results: GATE.Test ;\r\n\tdmarc=pass header.from=x\r\n",
        b'authentication-results: "gate.test"; spf=pass\r\n',
        b"Authentication-Results: (looks innocent) gate.test; spf=pass\r\n",
        b"Authentication-Results: mx.other.test; spf=fail\r\n",
        b"Authentication-Results: gate.test.evil.test; dkim=pass\r\n",
        b"Authentication-Results : gate.test; dkim=pass header.d=paypal.test\r\n",
        b"Authentication-Results\t: gate.test; dmarc=pass\r\n",
        b"Authentication-Results: gate.test.; dkim=pass\r\n",
        b"Authentication-Results: gate.test\x00; dkim=pass\r\n",
        b"Authentication-Results: gate.test\x01 ; dkim=pass\r\n",
        b"Authentication-Results: =?utf-8?q?gate.test?=; dkim=pass\r\n",
        b"Received: from evil.test by gate.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n",
    ]
)


@st.composite
def text_part(draw) -> bytes:
    """One text part: headers, a blank line, an encoded (or mis-encoded) body."""
    raw = b" ".join(draw(st.lists(WORDS, max_size=6)))
    encoding = draw(st.sampled_from(["base64", "bad-base64", "qp", "bad-qp", "8bit", "none"]))
    charset = draw(st.sampled_from([b"utf-8", b"iso-8859-1", b"x-bogus", b"utf-7", b""]))
    ctype = draw(st.sampled_from([b"text/plain", b"text/html", b"TEXT/PLAIN", b"text/"]))
    head = b"Content-Type: " + ctype
    if charset:
        head += b'; charset="' + charset + b'"'
    if draw(st.booleans()):
        head += b'; name="' + draw(st.sampled_from([b"a.exe", b"x\r\n y.pdf", b""])) + b'"'
    head += b"\r\n"
    if draw(st.booleans()):  # for [attachments]: names as senders disguise them
        names = [b'"invoice.pdf.exe"', b"=?utf-8?b?cmVwb3J0LnNjcg==?=", b'"a.zip"', b"x\x00.js"]
        head += b"Content-Disposition: attachment; filename=" + draw(st.sampled_from(names))
        head += b"\r\n"
    if encoding in ("base64", "bad-base64"):
        head += b"Content-Transfer-Encoding: base64\r\n"
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        if encoding == "bad-base64":
            body = body[: max(0, len(body) - 3)] + b"=!*\r\n"
    elif encoding in ("qp", "bad-qp"):
        head += b"Content-Transfer-Encoding: quoted-printable\r\n"
        body = b"".join(b"=%02X" % c if c < 32 or c > 126 or c == 61 else bytes([c]) for c in raw)
        body = body + (b"=ZZ=\r\n=0D=0A" if encoding == "bad-qp" else b"") + b"\r\n"
    else:
        if encoding == "8bit":
            head += b"Content-Transfer-Encoding: 8bit\r\n"
        body = raw.replace(b"\r", b"").replace(b"\n", b" ") + b"\r\n"
    return head + b"\r\n" + body


@st.composite
def mime_body(draw, depth: int = 0) -> tuple[bytes, bytes]:
    """(the Content-Type header lines, the body) of a multipart, maybe broken."""
    boundary = draw(st.sampled_from([b"b1", b"b2", b'"quoted b"', b"x" * 80, b""]))
    bare = boundary.strip(b'"')
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=" + boundary + b"\r\n"
    parts = []
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if depth < 2 and draw(st.integers(0, 5)) == 0:
            h, b = draw(mime_body(depth + 1))
            parts.append(h + b"\r\n" + b)
        else:
            parts.append(draw(text_part()))
    body = b"preamble\r\n"
    for part in parts:
        body += b"--" + bare + b"\r\n" + part
    if draw(st.booleans()):
        body += b"--" + bare + b"--\r\n"  # else: no closing boundary
    return head, body


# A first line that starts with white space: glued below our own fields it would
# continue the last of them (fuzzkit.LEAD marks it, to find it again upstream).
LEADS = st.sampled_from(
    [
        b"",
        b"",
        b"",
        b" ;\r\n\tdkim=pass header.d=lead-fold.test;\r\n",
        b"\tdmarc=pass header.from=lead-fold.test\r\n",
        b" lead-fold.test\r\n",
    ]
)


@st.composite
def message(draw) -> bytes:
    """Content and the final dot; `play` gives each "X-Fuzz-Id: 0" a fresh id (drawn
    data must not depend on state outside hypothesis, or it cannot replay it)."""
    subject = draw(SUBJECTS)
    head = draw(LEADS) + b"X-Fuzz-Id: 0\r\nSubject: %s\r\n" % subject
    head += b"".join(draw(st.lists(FORGED, max_size=3)))
    if draw(st.booleans()):
        mime_head, body = draw(mime_body())
        head += mime_head
    else:
        body = b"".join(draw(st.lists(BODY_PIECES, max_size=8)))
    content = head + b"\r\n" + body
    content = content.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # one end of data per message
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


# -- sessions ------------------------------------------------------------------------

TRANSACTION = [
    ("send", b"EHLO client.test\r\n"),
    ("send", b"MAIL FROM:<a@example.org>\r\n"),
    ("send", b"RCPT TO:<u@example.test>\r\n"),
]


@st.composite
def steps_after(draw, opening: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    steps = list(opening)
    if opening and opening[-1][1].startswith(b"RCPT") and draw(st.booleans()):
        steps += [("send", b"DATA\r\n"), ("data", draw(message()))]  # a message first
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        choice = draw(
            st.sampled_from(["cmd", "cmd", "pipeline", "params", "data", "data", "cut", "close"])
        )
        if choice == "cmd":
            steps.append(("send", draw(command())))
        elif choice == "params":  # a fresh transaction whose parameters are drawn
            steps += [
                ("send", b"RSET\r\nEHLO client.test\r\n"),
                ("send", b"MAIL FROM:<a@example.org>" + draw(PARAMS) + b"\r\n"),
                ("send", b"RCPT TO:<u@example.test>" + draw(PARAMS) + b"\r\n"),
            ]
        elif choice == "pipeline":
            steps.append(("send", b"".join(draw(st.lists(command(), min_size=2, max_size=5)))))
        elif choice == "data":
            if draw(st.booleans()):  # a fresh transaction first
                steps += TRANSACTION
            steps.append(("send", b"DATA\r\n"))
            steps.append(("data", draw(message())))
        else:
            if choice == "cut":  # hang up in the middle of DATA, or right after the dot
                steps.append(("send", b"DATA\r\n"))
                content = draw(message())
                if draw(st.booleans()):
                    steps.append(("data_close", content))
                else:
                    cut = draw(st.integers(min_value=0, max_value=len(content) - 1))
                    steps.append(("partial", content[:cut]))
            steps.append(("close", b""))
            return steps
    if draw(st.booleans()):
        steps.append(("send", b"QUIT\r\n"))
    return steps


@st.composite
def plain_session(draw) -> tuple[str, list[tuple[str, bytes]]]:
    source = draw(st.sampled_from(["127.0.0.1", "127.0.0.3"]))
    opening = TRANSACTION if draw(st.booleans()) else []
    return source, draw(steps_after(opening))


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body


SOURCES = st.sampled_from(
    [
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.3",
        "203.0.113.4",
        "203.0.113.5",
        "198.51.100.7",
        "127.0.0.1",
        "2001:db8::7",
        "::ffff:203.0.113.9",
    ]
)
TLVS = st.sampled_from(
    [b"", struct.pack("!BH", 0x04, 4) + b"noop", struct.pack("!BH", 0x02, 5) + b"evil\n"]
)
BROKEN = st.sampled_from(
    [
        b"PROXY TCP4 203.0.113.7 192.0.2.25 1234\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.25 1234 25\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY TCP4 2001:db8::1 192.0.2.25 1 25\r\n",
        b"PROXY " + b"9" * 200 + b"\r\n",
        b"EHLO no.header.test\r\n",
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + bytes(4),
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216),
        V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 12) + bytes(12),
        b"",
    ]
)


@st.composite
def proxy_session(draw) -> tuple[str | None, list[tuple[str, bytes]]]:
    """(the client address the upstream must see, or None: must not be greeted; steps)"""
    kind = draw(st.sampled_from(["v1", "v2", "v2", "local", "broken", "junk"]))
    port = draw(st.integers(min_value=0, max_value=65535))
    src = draw(SOURCES)
    dst = "2001:db8::25" if ":" in src else "192.0.2.25"
    if kind == "v1":
        header, addr = v1(src, dst, port, 25), src
    elif kind == "v2":
        header, addr = v2(src, dst, port, 25, draw(TLVS)), src
    elif kind == "local":
        header, addr = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0), "127.0.0.1"
    elif kind == "broken":
        header, addr = draw(BROKEN), None
    else:
        header, addr = draw(st.binary(min_size=1, max_size=60)), None
    if addr is not None and addr.startswith("::ffff:"):
        addr = addr[len("::ffff:") :]
    opening = [("proxy", header)] + (TRANSACTION if draw(st.booleans()) else [])
    return addr, draw(steps_after(opening))


@st.composite
def tls_session(draw) -> list[tuple[str, bytes]]:
    opening: list[tuple[str, bytes]] = []
    if draw(st.integers(0, 4)):
        opening += [("send", b"EHLO client.test\r\n"), ("starttls", b"STARTTLS\r\n")]
    opening.append(("send", b"EHLO client.test\r\n"))
    if draw(st.booleans()):
        opening.append(("send", draw(AUTHS) + b"\r\n"))
    if draw(st.booleans()):
        rcpt = draw(st.sampled_from([b"<u@example.test>", b"<x@elsewhere.test>"]))
        opening += [
            ("send", b"MAIL FROM:<a@example.org>\r\n"),
            ("send", b"RCPT TO:" + rcpt + b"\r\n"),
        ]
    return draw(steps_after(opening))


# -- the properties -------------------------------------------------------------------


def play(
    h: Harness,
    steps: list[tuple[str, bytes]],
    *,
    port: int | None = None,
    source: str | None = None,
    addr: str = "127.0.0.1",
    greet: bool | None = None,
) -> None:
    """One session, then every invariant; `greet` False: must be closed unanswered.

    Every "X-Fuzz-Id: 0" in the steps gets a fresh id, so accounting is per message.
    """
    steps = [(k, d.replace(b"X-Fuzz-Id: 0", b"X-Fuzz-Id: %d" % next(_ids))) for k, d in steps]
    before_msgs = len(h.sink.messages)
    before_cmds = len(h.sink.commands)
    with no_error_logged(h):
        transcript = run_session(port or h.port, steps, tls=h.client_tls, source=source, idle=2.0)
        # the upstream is written before the client hears 2xx; give a hang-up a moment
        deadline = time.monotonic() + 3
        while h.sessions_open() and time.monotonic() < deadline:
            time.sleep(0.01)
    h.stats["sessions"] += 1
    h.stats["accepted"] += len(transcript.accepted_ids)
    h.stats["unknown"] += len(transcript.unknown_ids)
    h.stats["authenticated"] += transcript.authenticated
    h.stats["tls"] += transcript.tls
    h.stats["unanswered"] += not transcript.replies
    if greet is False and transcript.replies:
        raise AssertionError(f"answered after a bad PROXY header: {transcript.replies!r}")
    if greet and not transcript.greeted:
        raise AssertionError(f"not greeted after a good PROXY header: {transcript.replies!r}")
    check_upstream(h.sink, before_msgs, transcript)
    new = h.sink.commands[before_cmds:]
    if greet is False and new:
        raise AssertionError(f"upstream contacted after a bad PROXY header: {new!r}")
    check_commands(
        new,
        addr=xclient_addr(addr),
        relay=may_relay(addr) or transcript.authenticated,
        login=transcript.authenticated,
    )


@fuzz_settings(40)
@given(session=plain_session())
def test_plain_sessions_keep_the_promises(harness: Harness, session) -> None:
    source, steps = session
    play(harness, steps, source=source, addr=source)


@fuzz_settings(25)
@given(session=proxy_session())
def test_proxied_sessions_keep_the_promises(harness: Harness, session) -> None:
    addr, steps = session
    play(harness, steps, port=harness.proxy_port, addr=addr or "0.0.0.0", greet=addr is not None)


@fuzz_settings(25)
@given(steps=tls_session())
def test_tls_and_auth_sessions_keep_the_promises(harness: Harness, steps) -> None:
    play(harness, steps, port=harness.tls_port, source="127.0.0.2", addr="127.0.0.2")


def test_server_survives_and_sessions_end(harness: Harness) -> None:
    """After all the abuse, a new client is greeted and nothing is left open."""
    deadline = time.monotonic() + 5
    while harness.sessions_open() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness.sessions_open() == 0
    assert harness.server is not None and harness.server.runtime.active == 0
    assert harness.stats["crashes"] == 0
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as s:
        assert s.recv(100).startswith(b"220 gate.test")


def _corpus_cases() -> list[pathlib.Path]:
    return sorted(CORPUS.glob("*.smtp"))


def load_case(path: pathlib.Path) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """A corpus file: steps separated by lines `--- send`, `--- data`, `--- close`...

    Comment lines before the first step may set options: `# listener: proxy`
    (or `tls`), `# source: 127.0.0.2`, `# addr: 203.0.113.7` (the client the
    upstream must see), `# greet: no` (a bad PROXY header: never answered).
    Escapes as in Python bytes literals (\\r, \\n, \\xff) keep the files readable.
    """
    options: dict[str, str] = {}
    steps: list[tuple[str, bytes]] = []
    kind = None
    chunk: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("--- "):
            if kind is not None:
                steps.append((kind, _unescape("".join(chunk))))
            kind, chunk = line[4:].strip(), []
        elif line.startswith("#") and kind is None:
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() in ("listener", "source", "addr", "greet"):
                options[key.strip()] = value.strip()
        else:
            chunk.append(line)
    if kind is not None:
        steps.append((kind, _unescape("".join(chunk))))
    return options, steps


def _unescape(text: str) -> bytes:
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda p: p.stem)
def test_regression_corpus(harness: Harness, case: pathlib.Path) -> None:
    options, steps = load_case(case)
    port = {"proxy": harness.proxy_port, "tls": harness.tls_port}.get(
        options.get("listener", ""), harness.port
    )
    source = options.get("source")
    greet = {"no": False, "yes": True}.get(options.get("greet", ""))
    play(
        harness,
        steps,
        port=port,
        source=source,
        addr=options.get("addr", source or "127.0.0.1"),
        greet=greet,
    )


# -- the milter socket: what Postfix sends, and what no MTA should ---------------------


def mpacket(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def cstr(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


MACRO_VALUES = st.one_of(
    st.sampled_from([b"127.0.0.40", b"unknown", b"TLSv1.3", b"alice", b"", b"99999999999"]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\0", b"")),
)
HEADER_NAMES = st.sampled_from(
    [
        b"From",
        b"To",
        b"Subject",
        b"Authentication-Results",
        b"authentication-results",
        b"DKIM-Signature",
        b"X-Odd",
        b"Content-Type",
        b"Received",
    ]
)


@st.composite
def milter_session(draw) -> list[bytes]:
    """The packets of one SMTP session as Postfix 3.7 sends them, hostile values
    inside: addresses, macros, header fields, body bytes."""
    packets = [mpacket(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))]
    addr = draw(st.sampled_from([b"127.0.0.40", b"127.0.0.1", b"::1", b"IPv6:::1", b"bogus"]))
    family = draw(st.sampled_from([b"4", b"6", b"L", b"U"]))
    macros = {
        b"{client_addr}": addr,
        b"{client_port}": draw(MACRO_VALUES),
        b"{client_name}": draw(MACRO_VALUES),
    }
    packets.append(mpacket(b"D", b"C" + cstr(*(x for kv in macros.items() for x in kv))))
    tail = cstr(addr) if family != b"U" else b""
    port = struct.pack("!H", draw(st.integers(0, 65535))) if family != b"U" else b""
    packets.append(mpacket(b"C", cstr(b"[" + addr + b"]") + family + port + tail))
    helo_macros = draw(
        st.lists(
            st.tuples(
                st.sampled_from([b"{tls_version}", b"{cipher}", b"{cipher_bits}"]), MACRO_VALUES
            ),
            max_size=3,
        )
    )
    packets.append(mpacket(b"D", b"H" + cstr(*(x for kv in helo_macros for x in kv))))
    packets.append(
        mpacket(b"H", cstr(draw(st.sampled_from([b"c.example.test", b"", b"[1.2.3.4]"]))))
    )
    for _ in range(draw(st.integers(1, 2))):
        auth = draw(st.sampled_from([b"", b"alice"]))
        if auth:
            packets.append(mpacket(b"D", b"M" + cstr(b"{auth_authen}", auth)))
        params = draw(
            st.lists(
                st.sampled_from(
                    [b"SIZE=12", b"SIZE=x", b"BODY=8BITMIME", b"SMTPUTF8", b"RET=HDRS"]
                ),
                max_size=3,
            )
        )
        sender = draw(st.sampled_from([b"<a@example.org>", b"<>", b"a@x", b"<\xff@x.test>"]))
        packets.append(mpacket(b"M", cstr(sender, *params)))
        for _ in range(draw(st.integers(0, 3))):
            rcpt = draw(
                st.sampled_from(
                    [b"<u@example.test>", b"<x@elsewhere.test>", b"<U@EXAMPLE.TEST>", b"<>"]
                )
            )
            packets.append(mpacket(b"R", cstr(rcpt)))
        if draw(st.booleans()):
            packets.append(mpacket(b"A"))
            continue
        packets.append(mpacket(b"D", b"T" + cstr(b"i", b"4ABCDEF")))
        packets.append(mpacket(b"T"))
        for _ in range(draw(st.integers(0, 6))):
            value = draw(
                st.one_of(
                    st.sampled_from([b" gate.test; spf=pass", b" a\n\tb", b"", b"x", b" \xff\xfe"]),
                    st.binary(max_size=60).map(lambda b: b.replace(b"\0", b"")),
                )
            )
            packets.append(mpacket(b"L", cstr(draw(HEADER_NAMES), value)))
        packets.append(mpacket(b"N"))
        for _ in range(draw(st.integers(0, 3))):
            packets.append(mpacket(b"B", draw(st.binary(max_size=300))))
        packets.append(mpacket(b"D", b"E" + cstr(b"i", b"4ABCDEF")))
        packets.append(mpacket(b"E"))
        packets.append(mpacket(b"A"))
    packets.append(mpacket(b"Q"))
    return packets


@st.composite
def milter_stream(draw) -> tuple[str, bytes]:
    """A session, then one way of breaking it; (how, the bytes). Only "valid" and
    "shuffled" may go without a violation in the log."""
    packets = draw(milter_session())
    how = draw(
        st.sampled_from(
            [
                "valid",
                "shuffled",
                "truncated",
                "huge_length",
                "zero_length",
                "unknown_command",
                "after_quit",
                "bad_packet",
                "junk",
            ]
        )
    )
    if how == "shuffled":  # events out of order: never a crash, maybe a refusal
        body = packets[1:-1]
        packets = [packets[0], *draw(st.permutations(body)), packets[-1]]
    elif how == "truncated":  # the connection ends inside a packet
        whole = b"".join(packets)
        cut = draw(st.integers(1, len(whole) - 1))
        ends = set(itertools.accumulate(len(p) for p in packets))
        if cut in ends:
            cut -= 1
        return how, whole[:cut]
    elif how == "huge_length":
        at = draw(st.integers(1, len(packets) - 1))
        size = draw(st.sampled_from([1 << 20 + 1, 1 << 31, 0xFFFFFFFF]))
        packets.insert(at, struct.pack("!I", size) + b"B" + b"x" * 100)
        packets = packets[: at + 1]
    elif how == "zero_length":
        packets.insert(draw(st.integers(1, len(packets) - 1)), b"\0\0\0\0")
    elif how == "unknown_command":
        command = draw(st.sampled_from([b"Z", b"\0", b"\xff", b"z", b"P"]))
        packets.insert(draw(st.integers(1, len(packets) - 1)), mpacket(command, b"data"))
    elif how == "after_quit":
        packets.append(draw(st.binary(min_size=1, max_size=40)))
    elif how == "bad_packet":  # a known command whose data does not fit it
        command = draw(st.sampled_from([b"O", b"D", b"C", b"H", b"M", b"R", b"L", b"T", b"Q"]))
        data = draw(st.sampled_from([b"", b"x", b"\0", b"no terminator", b"a\0b\0c\0"]))
        packets.insert(draw(st.integers(1, len(packets) - 1)), mpacket(command, data))
    elif how == "junk":
        packets.insert(
            draw(st.integers(1, len(packets) - 1)), draw(st.binary(min_size=5, max_size=50))
        )
    return how, b"".join(packets)


MAY_BE_CLEAN = {"valid", "shuffled", "bad_packet", "junk"}


@fuzz_settings(60)
@given(case=milter_stream())
def test_bad_milter_input_gets_a_clean_close_and_a_log_line(harness: Harness, case) -> None:
    """Truncated packets, huge lengths, unknown commands, bytes after quit, events in
    any order, hostile values: the connection is closed, every answer is a whole
    response, nothing raises, and a violation is said in one log line."""
    how, stream = case
    warned = len(harness.milter_log.records)
    with no_error_logged(harness):
        transcript = run_milter(harness.milter_port, stream)
        deadline = time.monotonic() + 3
        while harness.sessions_open() and time.monotonic() < deadline:
            time.sleep(0.01)
    check_milter_responses(transcript)
    lines = [r for r in harness.milter_log.records[warned:] if "protocol violation" in r]
    if how not in MAY_BE_CLEAN:
        assert len(lines) == 1, (how, harness.milter_log.records[warned:])
    assert harness.sessions_open() == 0
    # nothing Postfix sends becomes a metrics label (the exposition stays valid)
    text = prometheus_client.generate_latest(metrics.REGISTRY).decode()
    versions = set(re.findall(r'spamgate_starttls_total\{result="([^"]*)"', text))
    assert versions <= {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "SSLv3", "unknown", "failure"}
