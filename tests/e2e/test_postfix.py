"""spamgate in front of a real Postfix: delivery, XCLIENT, relayed refusals, smuggling.

One private Postfix serves the whole run (the `postfix` fixture). Each test uses a
client address of its own (127.0.0.x) and a unique marker, so that Postfix's log
lines and Maildir files can be tied to the test that caused them.
"""

from __future__ import annotations

import asyncio
import email
import re
import uuid

import pytest

from tests.kit.postfix import HOSTNAME, UNKNOWN_USER, PostfixError, PostfixInstance
from tests.kit.smtpclient import RawClient, Reply

from ..conftest import Gate, GateFactory, PostfixFactory, need_postfix
from .vectors import FAKE_ENDS, SMUGGLER, VICTIM, smuggling_message


def marker() -> str:
    return uuid.uuid4().hex


async def gate_to(
    gate_factory: GateFactory, postfix: PostfixInstance, extra: str = "", **server: str
) -> Gate:
    return await gate_factory(
        extra, upstream=None, server=server or None, up={"address": f'"{postfix.address}"'}
    )


def queue_id(reply: Reply) -> str:
    match = re.search(r"queued as ([0-9A-Za-z]+)", reply.text)
    assert match, f"no queue id in {reply}"
    return match.group(1)


async def delivered(postfix: PostfixInstance, mark: str) -> email.message.Message:
    raw = await asyncio.to_thread(postfix.wait_delivered, mark.encode())
    return email.message_from_bytes(raw)


async def log_line(postfix: PostfixInstance, pattern: str) -> str:
    match = await asyncio.to_thread(postfix.wait_log, pattern)
    return match.group(0)


async def test_delivered_with_the_real_client_address(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    gate = await gate_to(gate_factory, postfix)
    mark = marker()
    body = f"Subject: {mark}\r\nFrom: a@example.org\r\n\r\nHello\r\n..leading dot\r\n".encode()
    c, _ = await gate.client(source="127.0.0.5")
    replies = await c.mail("a@example.org", ["u@example.test"], body, helo="client.example.test")
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    qid = queue_id(replies[-1])  # Postfix's own words reach the client
    assert await c.quit_and_drain() == [221]

    msg = await delivered(postfix, mark)
    received = " ".join(msg.get_all("Received")[0].split())
    # XCLIENT: Postfix names the client spamgate saw, with its own EHLO name.
    assert received.startswith(
        f"from client.example.test (unknown [127.0.0.5]) by {HOSTNAME} (Postfix) "
        f"with ESMTP id {qid}"
    )
    assert msg["Delivered-To"] == "u@example.test"
    assert msg["Return-Path"] == "<a@example.org>"
    assert msg.get_payload() == "Hello\n.leading dot\n"  # unstuffed once, not twice
    await log_line(postfix, rf"{qid}: client=unknown\[127\.0\.0\.5\]")


async def test_without_xclient_postfix_sees_the_proxy(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    """The control for the test above: the address does come from XCLIENT."""
    gate = await gate_factory(
        upstream=None, up={"address": f'"{postfix.address}"', "xclient": "false"}
    )
    mark = marker()
    c, _ = await gate.client(source="127.0.0.6")
    replies = await c.mail(
        "a@example.org", ["u@example.test"], f"Subject: {mark}\r\n\r\nx\r\n".encode()
    )
    assert replies[-1].code == 250
    qid = queue_id(replies[-1])
    msg = await delivered(postfix, mark)
    received = " ".join(msg.get_all("Received")[0].split())
    assert received.startswith("from gate.test (unknown [127.0.0.1])")
    assert "127.0.0.6" not in str(msg)
    await log_line(postfix, rf"{qid}: client=unknown\[127\.0\.0\.1\]")


async def test_postfix_refusals_reach_the_client_verbatim(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    # spamgate relays elsewhere.test; Postfix does not, and says so itself.
    gate = await gate_to(gate_factory, postfix, relay_domains='["example.test", "elsewhere.test"]')
    c, _ = await gate.client(source="127.0.0.7")
    await c.cmd("EHLO refused.example.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd(f"RCPT TO:<{UNKNOWN_USER}@example.test>")
    assert str(r) == (
        f"550 5.1.1 <{UNKNOWN_USER}@example.test>: Recipient address rejected: "
        "User unknown in virtual mailbox table"
    )
    r = await c.cmd("RCPT TO:<u@elsewhere.test>")
    assert str(r) == "554 5.7.1 <u@elsewhere.test>: Relay access denied"
    # Relay denied means Postfix judged 127.0.0.7 (a stranger to it), not the
    # proxy at 127.0.0.1, which is in Postfix's mynetworks and may relay.
    line = await log_line(
        postfix, r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.7\]: 554 5\.7\.1 .*"
    )
    assert "helo=<refused.example.test>" in line
    assert (await c.cmd("DATA")).code == 554  # no recipient was accepted
    assert await c.quit_and_drain() == [221]


async def test_postfix_refusal_after_the_dot_is_relayed(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    limit = int(postfix.postconf("-h", "message_size_limit"))
    gate = await gate_to(gate_factory, postfix)  # spamgate's own limit is 10240000
    mark = marker()
    line = b"x" * 998 + b"\r\n"
    body = f"Subject: {mark}\r\n\r\n".encode() + line * (limit // len(line) + 1)
    c, _ = await gate.client(source="127.0.0.8")
    replies = await c.mail("a@example.org", ["u@example.test"], body)
    assert [r.code for r in replies[:-1]] == [250, 250, 250, 354]
    assert str(replies[-1]) == "552 5.3.4 Error: message file too big"
    # the session goes on, and the next message gets through
    replies = await c.mail(
        "a@example.org", ["u@example.test"], f"Subject: {mark}\r\n\r\nsmall\r\n".encode()
    )
    assert replies[-1].code == 250
    msg = await delivered(postfix, mark)
    assert msg.get_payload() == "small\n"


def test_postfix_refuses_bare_newlines_even_from_loopback(postfix: PostfixInstance) -> None:
    """What spamgate's docs ask of Postfix: no `$mynetworks` exemption for the proxy."""
    assert postfix.postconf("-h", "smtpd_forbid_bare_newline").strip() == "reject"
    assert postfix.postconf("-h", "smtpd_forbid_bare_newline_exclusions").strip() == ""
    assert "127.0.0.1/32" in postfix.postconf("-h", "mynetworks")

    async def talk() -> tuple[Reply, Reply]:
        c, _ = await RawClient.connect(postfix.port, source="127.0.0.1")
        await c.cmd("EHLO c.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<u@example.test>")
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: bare\r\n\r\nTesting\n.\r\nNO SMUGGLING\r\n.\r\n")
        refused = await c.reply()
        ehlo = await c.cmd("EHLO bare\nMAIL FROM:<x@example.org>")
        await c.close()
        return refused, ehlo

    refused, ehlo = asyncio.run(talk())
    assert str(refused) == f"550 5.5.2 {HOSTNAME} Error: bare <LF> received"
    assert (ehlo.code, ehlo.enhanced) == (550, "5.5.2")


NORMALIZED_VECTORS = ["lf.crlf", "lf.lf", "crlf.cr", "cr.crlf", "crlf.cr.crlf"]


@pytest.mark.parametrize("name", NORMALIZED_VECTORS)
async def test_smuggling_normalized_reaches_postfix_as_one_message(
    gate_factory: GateFactory, postfix: PostfixInstance, name: str
) -> None:
    gate = await gate_to(gate_factory, postfix, '[smtp]\nbare_newline = "normalize"\n')
    mark = marker()
    wire, _ = smuggling_message(FAKE_ENDS[name], mark)
    source = f"127.0.0.{20 + NORMALIZED_VECTORS.index(name)}"  # one per vector, for the log
    c, _ = await gate.client(source=source)
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    assert (await c.cmd("DATA")).code == 354
    await c.send(wire)
    r = await c.reply()
    assert r.code == 250  # Postfix took it: no bare line end was left to refuse
    qid = queue_id(r)
    assert await c.quit_and_drain() == [221]
    msg = await delivered(postfix, mark)
    assert msg["Subject"] == f"smuggling test {mark}"
    body = msg.get_payload()
    assert f"MAIL FROM:<{SMUGGLER}>" in body and "NO SMUGGLING" in body
    # Postfix logs through postlogd, later than it delivers: wait for the end of
    # the session, then count: one message queued for this client, the real one.
    escaped = source.replace(".", r"\.")
    await log_line(postfix, rf"disconnect from unknown\[{escaped}\]")
    await log_line(postfix, rf"{qid}: from=<a@example\.org>")
    log = postfix.log_text()
    assert re.findall(rf": client=unknown\[{escaped}\]", log) == [f": client=unknown[{source}]"]
    assert f"{qid}: client=unknown[{source}]" in log
    assert f"from=<{SMUGGLER}>" not in log and VICTIM not in log


async def test_smuggling_refused_never_reaches_postfix(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    gate = await gate_to(gate_factory, postfix)  # bare_newline = "reject"
    wire, _ = smuggling_message(FAKE_ENDS["lf.crlf"], marker())
    c, _ = await gate.client(source="127.0.0.10")
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    assert (await c.cmd("DATA")).code == 354
    await c.send(wire)
    r = await c.reply()
    assert (r.code, r.enhanced) == (550, "5.5.2")
    assert await c.quit_and_drain() == [221]
    # Postfix's session summary: the transaction was reset, DATA never sent.
    line = await log_line(postfix, r"disconnect from unknown\[127\.0\.0\.10\].*")
    assert "rset=1" in line and "data=" not in line


def test_instance_settings_can_be_extended_and_overridden() -> None:
    """For tests of shipped Postfix snippets: extra lines override, typos fail."""
    need_postfix()
    instance = PostfixInstance(
        main_extra="message_size_limit = 5000\n# a comment\n"
        "smtpd_client_restrictions = permit_mynetworks,\n    reject\n",
        smtpd_options={"smtpd_forbid_bare_newline": "normalize"},
    )
    try:
        instance.write_config()
        assert instance.postconf("-h", "message_size_limit").strip() == "5000"
        assert instance.postconf("-h", "smtpd_client_restrictions").strip() == (
            "permit_mynetworks, reject"
        )
        assert instance.postconf("-h", "smtpd_authorized_xclient_hosts").strip() == "127.0.0.0/8"
        assert instance.postconf("-P").strip() == (
            f"{instance.address}/inet/smtpd_forbid_bare_newline = normalize"
        )
    finally:
        instance.cleanup()


def test_instance_refuses_unknown_parameters(postfix_factory: PostfixFactory) -> None:
    with pytest.raises(PostfixError, match="unused parameter: smtpd_forbid_bare_newlin="):
        postfix_factory(main_extra=["smtpd_forbid_bare_newlin = reject"])
    with pytest.raises(PostfixError, match="unused parameter: smtpd_forbid_bare_newlin="):
        postfix_factory(smtpd_options={"smtpd_forbid_bare_newlin": "reject"})
