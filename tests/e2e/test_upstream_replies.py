"""Odd upstream replies while the upstream session is set up (EHLO, XCLIENT).

Refusals are relayed verbatim; a positive reply the core did not expect must
never reach the client as if it were the answer to its MAIL command.
"""

from __future__ import annotations

import pytest

from tests.kit.sink import Sink

from ..conftest import GateFactory

BODY = b"Subject: odd\r\n\r\nbody\r\n"


async def test_xclient_answered_with_250(gate_factory: GateFactory, sink: Sink) -> None:
    """Postfix's smtp-sink (the benchmark's upstream) says 250, not 220, to XCLIENT."""
    sink.behaviour.replies["XCLIENT"] = "250 2.0.0 Ok"
    gate = await gate_factory()
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY, helo="real.example.test")
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    assert len(sink.messages) == 1
    assert "ADDR=127.0.0.1" in sink.messages[0].xclient[0].split()
    assert sink.messages[0].helo == "real.example.test"


@pytest.mark.parametrize(
    ("command", "reply"),
    [("XCLIENT", "354 go ahead"), ("XCLIENT", "300 what"), ("EHLO", "220 sink.test ESMTP")],
)
async def test_positive_setup_reply_is_not_relayed(
    gate_factory: GateFactory, sink: Sink, command: str, reply: str
) -> None:
    sink.behaviour.replies[command] = reply
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.text) == (451, "4.3.0 Error: queue file write error")
    # the session is in a consistent state: no transaction, and a retry works
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503
    del sink.behaviour.replies[command]
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250


@pytest.mark.parametrize("command", ["XCLIENT", "EHLO"])
async def test_setup_refusal_is_relayed(
    gate_factory: GateFactory, sink: Sink, command: str
) -> None:
    sink.behaviour.replies[command] = "554 5.7.1 Client host rejected: go away"
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert str(r) == "554 5.7.1 Client host rejected: go away"
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("MAIL", "354 go ahead"),
        ("MAIL", "199 early"),
        ("RCPT", "334 VXNlcm5hbWU6"),
        ("DOT", "354 more"),
    ],
)
async def test_intermediate_reply_in_a_transaction_is_not_relayed(
    gate_factory: GateFactory, sink: Sink, command: str, reply: str
) -> None:
    """Only DATA (354) and AUTH (334) may have a 3xx: anything else from the upstream
    means it and spamgate disagree on where the dialogue is; the client gets a
    temporary failure, never a 354 it would take for an invitation to send."""
    sink.behaviour.replies[command] = reply
    gate = await gate_factory()
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    before = {"MAIL": [250], "RCPT": [250, 250], "DOT": [250, 250, 250, 354]}[command]
    assert [r.code for r in replies[: len(before)]] == before  # EHLO, MAIL, ...
    failure = replies[len(before)]
    assert (failure.code, failure.text) == (451, "4.3.0 Error: queue file write error")
    assert 354 not in [r.code for r in replies[len(before) :]]
    # a new transaction on a new upstream connection works
    del sink.behaviour.replies[command]
    await c.cmd("RSET")
    replies = await c.mail("a@example.org", ["u@example.test"], BODY, helo="again.example.test")
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    assert len(sink.messages) == 1
