"""The whole chain with a real Postfix, configured with the lines shipped in deploy/postfix/.

The private Postfix (tests/kit/postfix.py) starts from Postfix's own defaults for the
three settings at stake (no XCLIENT for anyone, bare newlines allowed, exclusions
$mynetworks), then gets exactly the listener entry of deploy/postfix/master.cf
and the contents of deploy/postfix/main.cf. If the shipped lines stopped doing
their job, these tests would see it.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import tomllib
import uuid

import pytest

from spamgate import metrics
from tests.kit.postfix import PostfixInstance
from tests.kit.smtpclient import RawClient, Reply

from ..conftest import GateFactory, PostfixFactory

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "postfix"
# Postfix's defaults for what the shipped lines must set (postconf -d), so that
# nothing but those lines can make the tests pass.
POSTFIX_DEFAULTS = [
    "smtpd_authorized_xclient_hosts =",
    "smtpd_forbid_bare_newline = no",
    "smtpd_forbid_bare_newline_exclusions = $mynetworks",
]
CLIENT = "127.0.0.5"  # a stranger to this Postfix (mynetworks = 127.0.0.1/32)


def shipped_listener(without: str | None = None) -> str:
    """The 127.0.0.1:10025 entry of deploy/postfix/master.cf, with the port left open.

    `without` drops the one `-o` line naming that parameter (for the controls).
    """
    lines = (DEPLOY / "master.cf").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("127.0.0.1:10025 "))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line[:1].isspace():
            break
        if without and line.strip().startswith(f"-o {without}="):
            continue
        entry.append(line)
    return "\n".join(entry).replace("127.0.0.1:10025", "{host}:{port}", 1)


def shipped_postfix(factory: PostfixFactory, without: str | None = None) -> PostfixInstance:
    main = (DEPLOY / "main.cf").read_text().splitlines()
    return factory(main_extra=POSTFIX_DEFAULTS + main, listener=shipped_listener(without))


@pytest.fixture(scope="module")
def shipped(postfix_factory: PostfixFactory) -> PostfixInstance:
    return shipped_postfix(postfix_factory)


def marker() -> str:
    return f"chain-{uuid.uuid4().hex[:12]}"


def message(mark: str, body: bytes = b"hello\r\n") -> bytes:
    head = f"Subject: {mark}\r\nFrom: a@example.org\r\nMessage-Id: <{mark}@example.org>\r\n"
    return head.encode() + b"\r\n" + body


async def test_shipped_lines_are_what_postfix_runs(shipped: PostfixInstance) -> None:
    params = shipped.postconf("-P").splitlines()
    port = f"127.0.0.1:{shipped.port}/inet"
    assert f"{port}/smtpd_authorized_xclient_hosts = static:all" in params
    assert f"{port}/smtpd_forbid_bare_newline = reject" in params
    assert f"{port}/smtpd_forbid_bare_newline_exclusions =" in params
    # and main.cf still has Postfix's defaults: nothing leaks to other listeners
    assert shipped.postconf("-h", "smtpd_authorized_xclient_hosts").strip() == ""
    assert shipped.postconf("-h", "smtpd_forbid_bare_newline").strip() == "no"


async def test_message_through_spamgate_is_delivered(
    gate_factory: GateFactory, shipped: PostfixInstance, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml, up={"address": f'"{shipped.address}"'})
    mark = marker()
    c, _ = await gate.client(source=CLIENT)
    await c.cmd("EHLO client.example.org")
    await c.starttls(tls_files.client_context())
    replies = await c.mail(
        "a@example.org", ["u@example.test"], message(mark), helo="client.example.org"
    )
    assert replies[-1].code == 250
    assert replies[-1].text.startswith("2.0.0 Ok: queued as ")  # Postfix's words
    delivered = shipped.wait_delivered(mark.encode())
    head = delivered.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
    # Postfix saw the real client (XCLIENT, authorised by the shipped line) ...
    assert (
        b"Received: from client.example.org (unknown [127.0.0.5])\n\tby mx.example.test (Postfix)"
        in head
    )
    # ... and below its line, ours records the TLS the client used
    ours = head.index(b"\n\t(using TLSv1.3 with cipher ")
    assert head.index(b"by mx.example.test (Postfix)") < ours
    assert b"by gate.test (spamgate) with ESMTPS id " in head[ours:]
    shipped.wait_log(r"postfix/spamgate/smtpd\[\d+\]: \w+: client=unknown\[127\.0\.0\.5\]")


async def test_shipped_pool_reuses_connections_to_the_shipped_listener(
    gate_factory: GateFactory, shipped: PostfixInstance
) -> None:
    # deploy/spamgate.toml's pool_size against the shipped master.cf line: the
    # second client is introduced on the first one's connection, and Postfix
    # sees each real client.
    shipped_toml = tomllib.loads((DEPLOY.parent / "spamgate.toml").read_text())
    pool_size = shipped_toml["upstream"]["pool_size"]
    assert pool_size > 0
    gate = await gate_factory(up={"address": f'"{shipped.address}"', "pool_size": str(pool_size)})
    reused = metrics.UPSTREAM_CONNECTIONS.labels("reused")
    before = reused._value.get()
    marks = []
    for n, source in enumerate(("127.0.0.5", "127.0.0.6")):
        mark = marker()
        c, _ = await gate.client(source=source)
        replies = await c.mail(
            "a@example.org", ["u@example.test"], message(mark), helo=f"c{n}.example.org"
        )
        assert replies[-1].code == 250
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
        marks.append(mark)
        if n == 0:  # the connection goes back to the pool once the session ends
            pool = gate.server.app.upstream.pool
            for _ in range(200):
                if pool.idle:
                    break
                await asyncio.sleep(0.01)
    assert reused._value.get() == before + 1
    for mark, source in zip(marks, ("127.0.0.5", "127.0.0.6"), strict=True):
        head = shipped.wait_delivered(mark.encode()).split(b"\r\n\r\n", 1)[0]
        assert f"(unknown [{source}])".encode() in head


SMUGGLE = b"line one\nMAIL FROM:<evil@example.org>\r\n"


async def test_bare_lf_refused_by_spamgate_and_by_postfix(
    gate_factory: GateFactory, shipped: PostfixInstance
) -> None:
    mark = marker()
    data = message(mark, SMUGGLE)
    # through spamgate: refused before any of it reaches Postfix
    gate = await gate_factory(up={"address": f'"{shipped.address}"'})
    c, _ = await gate.client(source=CLIENT)
    replies = await c.mail("a@example.org", ["u@example.test"], data)
    assert (replies[-1].code, replies[-1].enhanced) == (550, "5.5.2")
    # straight to the Postfix listener, from loopback (in $mynetworks, where the
    # default exclusions would have let it through): refused by Postfix too
    reply = await straight_to_postfix(shipped, data)
    assert (reply.code, reply.text) == (550, "5.5.2 mx.example.test Error: bare <LF> received")
    assert not any(mark.encode() in m for m in shipped.delivered())


async def straight_to_postfix(instance: PostfixInstance, data: bytes) -> Reply:
    c, banner = await RawClient.connect(instance.port, source="127.0.0.1")
    assert banner.code == 220
    await c.cmd("EHLO loopback.example.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(data + b".\r\n")
    r = await c.reply()
    await c.close()
    return r


async def test_control_default_exclusions_let_loopback_smuggle(
    postfix_factory: PostfixFactory,
) -> None:
    # The same listener without the empty exclusions line: from loopback, Postfix
    # takes the bare LF. This is why the shipped line is there.
    instance = shipped_postfix(postfix_factory, without="smtpd_forbid_bare_newline_exclusions")
    mark = marker()
    assert (await straight_to_postfix(instance, message(mark, SMUGGLE))).code == 250
    instance.wait_delivered(mark.encode())


async def test_control_xclient_not_authorised(
    gate_factory: GateFactory, postfix_factory: PostfixFactory, caplog
) -> None:
    # Without the authorisation line: what docs/deploy.md's troubleshooting says.
    instance = shipped_postfix(postfix_factory, without="smtpd_authorized_xclient_hosts")
    gate = await gate_factory(up={"address": f'"{instance.address}"'})
    c, _ = await gate.client(source=CLIENT)
    await c.cmd("EHLO client.example.org")
    with caplog.at_level(logging.WARNING, logger="spamgate"):
        r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.text) == (451, "4.3.0 Error: queue file write error")
    assert (
        "upstream MAIL failed: xclient: upstream does not offer XCLIENT: authorise us with "
        "smtpd_authorized_xclient_hosts" in caplog.text
    )
