"""Every header field spamgate adds, and content that tries to continue one of them.

spamgate puts its own fields (Authentication-Results, its Received line in TLS
sessions, X-Spam-* when it tags, PREPEND results) above the client's content. A
message whose first line starts with a space or a tab would, glued on below
them, read as a continuation of the last one: the client would write into our
Authentication-Results. Postfix's smtpd has the same problem with its own
Received line and solves it by starting such content with an empty line, which
makes all of it body (smtpd.c: "Force an empty record when the queue file
content begins with whitespace"); spamgate does the same.
"""

from __future__ import annotations

import email
import email.policy
import re

import authres
import authres.dmarc
import pytest

from spamgate.message import Message, render_headers
from tests.kit.postfix import PostfixInstance
from tests.kit.sink import Sink

from ..conftest import GateFactory, TlsFiles
from .test_postfix import delivered, gate_to, marker

PARSER = authres.FeatureContext(authres.dmarc)

# The message found by probing: after DATA, a first line that starts with a space.
FOLDING = (
    b" ;\r\n\tdkim=pass header.d=nospf.test header.s=s1;\r\n"
    b"\tdmarc=pass header.from=nospf.test\r\n"
    b"From: CEO <ceo@nospf.test>\r\n"
    b"Subject: pay this now\r\n"
    b"\r\n"
    b"Wire the money.\r\n"
)

RULES = {
    "helo.regexp": "/^(.*)$/ PREPEND X-Helo-Seen: $1\n",
    "sender.regexp": "/^(.*)$/ SCORE 6 ANY_SENDER\n",
    "recipient.regexp": "/^(.*)$/ PREPEND X-Rcpt-Seen: $1\n",
}
CONFIG = """
[rules]
helo = ["regexp:helo.regexp"]
sender = ["regexp:sender.regexp"]
recipient = ["regexp:recipient.regexp"]
[scoring]
tag = 5
"""
# Every field spamgate adds in that configuration, over TLS.
OURS = {
    "authentication-results",
    "x-helo-seen",
    "x-rcpt-seen",
    "x-spam-flag",
    "x-spam-score",
    "x-spam-symbols",
    "received",
}


def fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of a header block."""
    out = []
    for raw in re.split(rb"\r\n(?![ \t])", block.rstrip(b"\r\n")):
        name, _, value = raw.partition(b":")
        out.append((name.decode().lower(), re.sub(r"\r\n(?=[ \t])", "", value.decode()).strip()))
    return out


@pytest.fixture
def write(tmp_path):
    for name, text in RULES.items():
        (tmp_path / name).write_text(text)


async def send_over_tls(gate, tls_files: TlsFiles, content: bytes) -> int:
    c, _ = await gate.client(source="127.0.0.5")
    await c.cmd("EHLO c.example.test")
    assert (await c.starttls(tls_files.client_context())).code == 220
    replies = await c.mail("a@example.org", ["u@example.test"], content, helo="c.example.test")
    await c.close()
    return replies[-1].code


async def test_content_starting_with_white_space_cannot_continue_our_headers(
    gate_factory: GateFactory, sink: Sink, tls_files: TlsFiles, write
) -> None:
    gate = await gate_factory(tls_files.toml + CONFIG)
    assert await send_over_tls(gate, tls_files, FOLDING) == 250
    got = sink.messages[0].content
    head, sep, body = got.partition(b"\r\n\r\n")
    assert sep and body == FOLDING  # all of the client's content is body, as it came
    added = fields(head)
    assert {name for name, _ in added} == OURS  # every field we add is there...
    for name, value in added:  # ...and none holds a byte of the client's content
        assert "nospf" not in value and "dmarc=pass" not in value, (name, value)
    ar = PARSER.parse_value(dict(added)["authentication-results"])
    assert ar.authserv_id == "gate.test"
    assert not any(r.result == "pass" for r in ar.results)
    # A reader of the whole message agrees: no From, one Authentication-Results.
    msg = email.message_from_bytes(got, policy=email.policy.default)
    assert msg["From"] is None and len(msg.get_all("Authentication-Results")) == 1


@pytest.mark.parametrize("lead", [b" ", b"\t", b"\t\r\n", b"   x: y\r\n"])
async def test_every_white_space_start_is_body(
    gate_factory: GateFactory, sink: Sink, lead: bytes
) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.5")
    content = lead + b"tail\r\nSubject: s\r\n\r\nx\r\n"
    replies = await c.mail("a@example.org", ["u@example.test"], content)
    assert replies[-1].code == 250
    got = sink.messages[0].content
    assert got.endswith(b"\r\n\r\n" + content)
    assert fields(got[: -len(content) - 2])[0][0] == "authentication-results"


async def test_a_spooled_message_starting_with_white_space_is_body(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    gate = await gate_factory(
        "[limits]\nspool_size = 1024\n", server={"spool_dir": f'"{tmp_path}"'}
    )
    c, _ = await gate.client(source="127.0.0.5")
    content = FOLDING + b"x" * 70 + b"\r\n" * 1000
    assert (await c.mail("a@example.org", ["u@example.test"], content))[-1].code == 250
    got = sink.messages[0].content
    assert got.endswith(b"\r\n\r\n" + content)
    assert b"nospf" not in got[: -len(content)]


async def test_ordinary_content_gets_no_empty_line(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.5")
    content = b"Subject: s\r\n\r\nx\r\n"
    assert (await c.mail("a@example.org", ["u@example.test"], content))[-1].code == 250
    got = sink.messages[0].content
    assert got.endswith(b"\r\n" + content) and not got.endswith(b"\r\n\r\n" + content)


def test_a_message_starting_with_white_space_has_no_header_fields() -> None:
    """What the checks see is what the reader downstream sees: all body."""
    msg = Message(FOLDING)
    assert msg.headers == () and msg.get_all("From") == []
    assert msg.header_bytes == b"" and msg.body == FOLDING
    out = msg.relayed(b"X-Ours: 1\r\n")
    assert out.to_bytes() == b"X-Ours: 1\r\n\r\n" + FOLDING and out.size == len(out.to_bytes())


def test_rendered_values_cannot_break_a_line() -> None:
    """However a value was made, it stays one field: a CR or LF is a fold or a space."""
    rendered = render_headers(
        [
            ("X-A", "one\r\ntwo"),
            ("X-B", "x\nX-Injected: 1"),
            ("X-C", "y\r\n\r\nbody"),
            ("X-D", "z\r\n\tfolded"),
            ("X-E", "nul\x00bell\x07"),
        ]
    )
    lines = rendered.split(b"\r\n")[:-1]
    assert [line.split(b":")[0] for line in lines if line[:1] not in (b" ", b"\t")] == [
        b"X-A",
        b"X-B",
        b"X-C",
        b"X-D",
        b"X-E",
    ]
    assert all(line.strip() for line in lines)  # no empty line: the header goes on
    assert b"\n" not in rendered.replace(b"\r\n", b"") and b"\r" not in rendered.replace(
        b"\r\n", b""
    )
    assert b"\x00" not in rendered and b"\x07" not in rendered
    assert b"X-D: z\r\n\tfolded\r\n" in rendered  # a proper fold stays


async def test_postfix_delivers_the_client_content_as_body(
    gate_factory: GateFactory, postfix: PostfixInstance, tls_files: TlsFiles, write
) -> None:
    gate = await gate_to(gate_factory, postfix, tls_files.toml + CONFIG)
    mark = marker()
    assert await send_over_tls(gate, tls_files, FOLDING + mark.encode() + b"\r\n") == 250
    msg = await delivered(postfix, mark)
    ours = [v for v in msg.get_all("Authentication-Results") or [] if "gate.test" in v]
    assert len(ours) == 1
    assert "dkim=pass" not in ours[0] and "dmarc=pass" not in ours[0]
    assert "nospf" not in str(msg.get_all("Received"))
    assert msg["From"] is None or "nospf" not in msg["From"]
    assert "From: CEO <ceo@nospf.test>" in msg.get_payload()
