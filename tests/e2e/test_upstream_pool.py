"""Upstream connection reuse ([upstream] pool_size): one connection, many clients.

A pooled connection is handed to the next client session only in a known, clean
state, and every session on it introduces its own client (XCLIENT, then the
client's EHLO): the upstream must never see one client's mail under another's name.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from spamgate import metrics
from tests.kit.postfix import HOSTNAME, PostfixInstance
from tests.kit.sink import Sink

from ..conftest import Gate, GateFactory, PostfixFactory
from .test_postfix import delivered, log_line, marker, queue_id

BODY = b"Subject: pooled\r\n\r\nbody\r\n"
POOL = {"pool_size": "2"}


def xclient_attrs(line: str) -> dict[str, str]:
    return dict(a.split("=", 1) for a in line.split())


def pooled(gate: Gate) -> int:
    return len(gate.server.app.upstream.pool.idle)


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def session(
    gate: Gate, source: str, helo: str, rcpts: tuple[str, ...] = ("u@example.test",)
) -> list[int]:
    """One client session: a message, then QUIT; the reply codes."""
    c, _ = await gate.client(source=source)
    replies = await c.mail("a@example.org", list(rcpts), BODY, helo=helo)
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    return [r.code for r in replies]


def reused() -> float:
    return metrics.UPSTREAM_CONNECTIONS.labels("reused")._value.get()


async def test_one_connection_each_client_introduced(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up=POOL)
    assert await session(gate, "127.0.0.2", "first.example.test") == [250, 250, 250, 354, 250]
    await until(lambda: pooled(gate) == 1)
    assert await session(gate, "127.0.0.3", "second.example.test") == [250, 250, 250, 354, 250]
    assert sink.connections == 1
    assert "QUIT" not in sink.commands
    first, second = sink.messages
    assert xclient_attrs(first.xclient[-1])["ADDR"] == "127.0.0.2"
    assert first.helo == "first.example.test"
    attrs = xclient_attrs(second.xclient[-1])
    assert (attrs["ADDR"], attrs["HELO"]) == ("127.0.0.3", "second.example.test")
    assert second.helo == "second.example.test"
    # The second client's XCLIENT, then its own EHLO, then its MAIL: nothing else.
    i = sink.commands.index(f"XCLIENT {second.xclient[-1]}")
    assert sink.commands[i + 1 : i + 3] == [
        "EHLO second.example.test",
        "MAIL FROM:<a@example.org>",
    ]


async def test_pool_off_by_default(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: "QUIT" in sink.commands)
    await session(gate, "127.0.0.3", "b.example.test")
    assert sink.connections == 2
    assert pooled(gate) == 0


async def test_error_since_last_delivery_means_a_new_connection(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """Postfix counts the error against the connection, whoever the next client is."""
    sink.behaviour.refuse_local = "nobody"
    gate = await gate_factory(up=POOL)
    c, _ = await gate.client(source="127.0.0.2")
    await c.cmd("EHLO a.example.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<nobody@example.test>")).code == 550
    assert (await c.cmd("RSET")).code == 250
    assert (await c.cmd("QUIT")).code == 221
    await until(lambda: "QUIT" in sink.commands)
    assert pooled(gate) == 0
    await session(gate, "127.0.0.3", "b.example.test")
    assert sink.connections == 2


async def test_a_delivery_forgives_earlier_errors(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.refuse_local = "nobody"
    gate = await gate_factory(up=POOL)
    codes = await session(
        gate, "127.0.0.2", "a.example.test", ("nobody@example.test", "u@example.test")
    )
    assert codes == [250, 250, 550, 250, 354, 250]
    await until(lambda: pooled(gate) == 1)
    await session(gate, "127.0.0.3", "b.example.test")
    assert sink.connections == 1


async def test_aborted_transaction_is_not_pooled(gate_factory: GateFactory, sink: Sink) -> None:
    """A client gone in mid-transaction leaves the upstream inside it: QUIT, not pool."""
    gate = await gate_factory(up=POOL)
    c, _ = await gate.client(source="127.0.0.2")
    await c.cmd("EHLO a.example.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    await c.close()
    await until(lambda: "QUIT" in sink.commands)
    assert pooled(gate) == 0


async def test_connection_closed_by_the_upstream_is_not_used(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory(up=POOL)
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    sink.sessions[0].transport.close()  # as Postfix does after smtpd_timeout
    await asyncio.sleep(0.05)
    assert await session(gate, "127.0.0.3", "b.example.test") == [250, 250, 250, 354, 250]
    assert sink.connections == 2
    assert xclient_attrs(sink.messages[1].xclient[-1])["ADDR"] == "127.0.0.3"


async def test_failure_on_a_reused_connection_retries_on_a_new_one(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """The upstream's 421 (its idle timeout, racing our XCLIENT) costs the client nothing."""
    gate = await gate_factory(up=POOL)
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    sink.behaviour.once["XCLIENT"] = "421 4.4.2 sink.test Error: timeout exceeded"
    assert await session(gate, "127.0.0.3", "b.example.test") == [250, 250, 250, 354, 250]
    assert sink.connections == 2
    assert xclient_attrs(sink.messages[1].xclient[-1])["ADDR"] == "127.0.0.3"


async def test_refusal_about_the_client_is_relayed(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up=POOL)
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    sink.behaviour.replies["XCLIENT"] = "554 5.7.1 Client host rejected: go away"
    c, _ = await gate.client(source="127.0.0.3")
    await c.cmd("EHLO b.example.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert str(r) == "554 5.7.1 Client host rejected: go away"
    assert len(sink.messages) == 1


async def test_upstream_that_refuses_a_second_xclient(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """Postfix authorising only the proxy: after XCLIENT it stops offering XCLIENT
    (and would refuse it), so no connection is offered to a second client."""
    sink.behaviour.xclient_chain = False
    gate = await gate_factory(up=POOL)
    before = reused()
    with caplog.at_level(logging.WARNING, logger="spamgate.upstream"):
        for n in range(3):
            codes = await session(gate, f"127.0.0.{n + 2}", f"c{n}.example.test")
            assert codes == [250, 250, 250, 354, 250]
            await until(lambda n=n: sink.commands.count("QUIT") == n + 1)
    assert sink.connections == 3
    assert [len(m.xclient) for m in sink.messages] == [1, 1, 1]
    assert [xclient_attrs(m.xclient[0])["ADDR"] for m in sink.messages] == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ]
    assert reused() == before
    warnings = [r for r in caplog.records if "smtpd_authorized_xclient_hosts" in r.message]
    assert len(warnings) == 1


async def test_second_xclient_refused_outright(gate_factory: GateFactory, sink: Sink) -> None:
    """If the refusal comes only at XCLIENT, the client still gets a new connection."""
    gate = await gate_factory(up=POOL)
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    sink.behaviour.once["XCLIENT"] = "550 5.7.0 Error: insufficient authorization"
    assert await session(gate, "127.0.0.3", "b.example.test") == [250, 250, 250, 354, 250]
    assert sink.connections == 2
    await until(lambda: sink.commands.count("QUIT") == 2)
    # reuse is off now: the next session does not try the pool
    assert pooled(gate) == 0
    await session(gate, "127.0.0.4", "c.example.test")
    assert sink.connections == 3


async def test_pool_is_bounded(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up={"pool_size": "1"})
    clients = []
    for n in range(3):
        c, _ = await gate.client(source=f"127.0.0.{n + 2}")
        await c.cmd(f"EHLO c{n}.example.test")
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
        clients.append(c)
    assert sink.connections == 3
    for c in clients:
        assert (await c.cmd("QUIT")).code == 221
    # each left in mid-transaction: none is fit for reuse
    await until(lambda: sink.commands.count("QUIT") == 3)
    assert pooled(gate) == 0
    clients = []
    for n in range(3):
        c, _ = await gate.client(source=f"127.0.0.{n + 2}")
        await c.cmd(f"EHLO c{n}.example.test")
        clients.append(c)
    for c in clients:
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert sink.connections == 6
    for c in clients:
        assert (await c.cmd("RSET")).code == 250
        assert (await c.cmd("QUIT")).code == 221
    # three clean connections, room for one: two say QUIT
    await until(lambda: sink.commands.count("QUIT") == 5)
    assert pooled(gate) == 1


async def test_idle_connection_closed_after_timeout(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up={"pool_size": "2", "pool_idle_timeout": "0.2"})
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    await until(lambda: "QUIT" in sink.commands, timeout=2)
    assert pooled(gate) == 0


async def test_shutdown_closes_pooled_connections(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up=POOL)
    await session(gate, "127.0.0.2", "a.example.test")
    await until(lambda: pooled(gate) == 1)
    await gate.stop()
    assert sink.commands[-1] == "QUIT"


async def test_new_helo_in_a_session_reintroduces(gate_factory: GateFactory, sink: Sink) -> None:
    """A second EHLO with another name: the upstream hears it through XCLIENT again."""
    gate = await gate_factory(up=POOL)
    c, _ = await gate.client(source="127.0.0.2")
    replies = await c.mail("a@example.org", ["u@example.test"], BODY, helo="one.example.test")
    assert replies[-1].code == 250
    replies = await c.mail("a@example.org", ["u@example.test"], BODY, helo="two.example.test")
    assert replies[-1].code == 250
    assert sink.connections == 1
    assert [m.helo for m in sink.messages] == ["one.example.test", "two.example.test"]
    assert xclient_attrs(sink.messages[1].xclient[-1])["HELO"] == "two.example.test"
    await c.close()


async def helo_session(gate: Gate, source: str, helo: str) -> int:
    c, _ = await gate.client(source=source)
    await c.cmd(f"HELO {helo}")
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    await c.cmd("DATA")
    await c.send(BODY + b".\r\n")
    code = (await c.reply()).code
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    return code


@pytest.mark.parametrize("chain", [True, False])
async def test_helo_clients(gate_factory: GateFactory, sink: Sink, chain: bool) -> None:
    """HELO's reply lists no extensions, so whether XCLIENT may follow is learnt by
    trying: a refusal costs that session a new connection and stops reuse."""
    sink.behaviour.xclient_chain = chain
    gate = await gate_factory(up=POOL)
    for n in range(3):
        assert await helo_session(gate, f"127.0.0.{n + 2}", f"c{n}.example.test") == 250
        await asyncio.sleep(0.05)
    assert [xclient_attrs(m.xclient[-1])["ADDR"] for m in sink.messages] == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ]
    assert [m.helo for m in sink.messages] == [f"c{n}.example.test" for n in range(3)]
    assert "HELO c1.example.test" in sink.commands
    assert sink.connections == (1 if chain else 3)


# -- with a real Postfix ------------------------------------------------------------


async def postfix_session(gate: Gate, source: str, helo: str) -> tuple[str, str]:
    """One message through spamgate to Postfix; its marker and queue id."""
    mark = marker()
    body = f"Subject: {mark}\r\nFrom: a@example.org\r\n\r\npooled\r\n".encode()
    c, _ = await gate.client(source=source)
    replies = await c.mail("a@example.org", ["u@example.test"], body, helo=helo)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    return mark, queue_id(replies[-1])


async def test_postfix_sees_each_client_on_a_reused_connection(
    gate_factory: GateFactory, postfix: PostfixInstance
) -> None:
    """The fixture authorises XCLIENT from 127.0.0.0/8, the test clients included."""
    gate = await gate_factory(
        upstream=None, up={"address": f'"{postfix.address}"', "pool_size": "1"}
    )
    before = reused()
    first = await postfix_session(gate, "127.0.0.41", "first.pool.test")
    await until(lambda: pooled(gate) == 1)
    second = await postfix_session(gate, "127.0.0.42", "second.pool.test")
    assert reused() == before + 1
    lines = []
    for (mark, qid), helo, addr in zip(
        (first, second), ("first", "second"), ("41", "42"), strict=True
    ):
        msg = await delivered(postfix, mark)
        received = " ".join(msg.get_all("Received")[0].split())
        assert received.startswith(
            f"from {helo}.pool.test (unknown [127.0.0.{addr}]) by {HOSTNAME} (Postfix) "
            f"with ESMTP id {qid}"
        )
        lines.append(
            await log_line(postfix, rf"smtpd\[\d+\]: {qid}: client=unknown\[127\.0\.0\.{addr}\]")
        )
    # one smtpd process, one connection, two clients
    pids = {re.search(r"smtpd\[(\d+)\]", line).group(1) for line in lines}
    assert len(pids) == 1


@pytest.mark.parametrize("authorized", ["127.0.0.1", "static:all"])
async def test_postfix_xclient_authorization_decides_reuse(
    gate_factory: GateFactory,
    postfix_factory: PostfixFactory,
    caplog: pytest.LogCaptureFixture,
    authorized: str,
) -> None:
    """With only the proxy's address allowed to send XCLIENT, Postfix refuses XCLIENT
    from the client it names, so connections are not reused; `static:all` (as
    shipped in deploy/postfix/master.cf) allows reuse."""
    instance = postfix_factory(main_extra=[f"smtpd_authorized_xclient_hosts = {authorized}"])
    gate = await gate_factory(
        upstream=None, up={"address": f'"{instance.address}"', "pool_size": "1"}
    )
    before = reused()
    with caplog.at_level(logging.WARNING, logger="spamgate.upstream"):
        sent = []
        for n in (43, 44, 45):
            sent.append(await postfix_session(gate, f"127.0.0.{n}", f"c{n}.pool.test"))
            await asyncio.sleep(0.05)
    for (mark, qid), n in zip(sent, (43, 44, 45), strict=True):
        msg = await delivered(instance, mark)
        assert f"(unknown [127.0.0.{n}])" in " ".join(msg.get_all("Received")[0].split())
        await log_line(instance, rf"{qid}: client=unknown\[127\.0\.0\.{n}\]")
    refused = "smtpd_authorized_xclient_hosts" in caplog.text
    if authorized == "static:all":
        assert reused() == before + 2 and not refused
    else:
        assert reused() == before and refused
        assert "insufficient authorization" not in instance.log_text()
