"""The connection state machine, driven with bytes and decisions only (no socket)."""

from __future__ import annotations

import pytest

from spamgate.milter import codec
from spamgate.milter.codec import (
    AddHeader,
    ChangeHeader,
    Continue,
    Discard,
    Quarantine,
    ReplyCode,
    Skip,
    Violation,
)
from spamgate.milter.connection import BadDecision, End, MilterConnection, Send, Step
from spamgate.milter.negotiate import Needs
from spamgate.milter.protocol import Command
from tests.kit.milterkit import connect, cstrings, macros, mta_packet, optneg


def opened(needs: Needs | None = None) -> MilterConnection:
    conn = MilterConnection(needs or Needs())
    (out,) = conn.receive(optneg())
    assert isinstance(out, Send) and out.data[4:5] == b"O"
    return conn


def test_a_session_as_postfix_sends_it() -> None:
    conn = opened()
    steps = conn.receive(
        macros(b"C", j="mx.test", client_addr="127.0.0.9")
        + connect()
        + macros(b"H")
        + mta_packet(b"H", cstrings("client.test"))
    )
    assert [type(s.event) for s in steps] == [codec.Connect, codec.Helo]
    assert steps[0].macros == {"j": "mx.test", "{client_addr}": "127.0.0.9"}
    assert steps[1].macros == {} and all(s.replies for s in steps)
    assert conn.answer(steps[0], Continue()) == b"\0\0\0\1c"
    # macros belong to their event only
    (mail,) = conn.receive(mta_packet(b"M", cstrings("<a@b.test>")))
    assert mail.macros == {}
    (abort,) = conn.receive(mta_packet(b"A"))
    assert isinstance(abort.event, codec.Abort) and not abort.replies
    assert conn.receive(mta_packet(b"Q")) == [End()]
    assert conn.ended and conn.eof() == []


def test_events_before_negotiation_or_twice() -> None:
    (end,) = MilterConnection(Needs()).receive(connect())
    assert isinstance(end, End) and end.violation.kind is Violation.OUT_OF_ORDER
    conn = opened()
    (end,) = conn.receive(optneg())
    assert end.violation.kind is Violation.OUT_OF_ORDER
    (end,) = MilterConnection(Needs()).receive(optneg(version=1))
    assert end.violation is not None


def test_eof_inside_a_packet() -> None:
    conn = opened()
    assert conn.receive(connect()[:7]) == []
    (end,) = conn.eof()
    assert end.violation.kind is Violation.TRUNCATED
    clean = opened()
    assert clean.eof() == [End(None)]  # Postfix closes without QUIT after a refusal


def test_quit_new_connection_keeps_the_negotiation() -> None:
    conn = opened()
    conn.receive(macros(b"C", j="one") + connect())
    (quit_nc,) = conn.receive(mta_packet(b"K"))
    assert isinstance(quit_nc.event, codec.QuitNewConnection) and not quit_nc.replies
    (again,) = conn.receive(macros(b"C", j="two") + connect(addr="127.0.0.10"))
    assert again.macros == {"j": "two"} and again.event.address == "127.0.0.10"


def step(event: object, replies: bool = True) -> Step:
    return Step(event, {}, replies)  # type: ignore[arg-type]


def test_answers_are_checked_against_the_event() -> None:
    conn = opened()
    with pytest.raises(BadDecision):
        conn.answer(step(codec.Connect("h", codec.Family.INET)), Discard())
    with pytest.raises(BadDecision):
        conn.answer(step(codec.Helo("h")), Discard())
    with pytest.raises(BadDecision):  # SKIP was not negotiated
        conn.answer(step(codec.Body(b"x")), Skip())
    with pytest.raises(BadDecision):  # edits only at the end of message
        conn.answer(step(codec.Data()), Continue(), (AddHeader("X", "y"),))
    reply = ReplyCode(550, "5.7.1", ("no",))
    assert conn.answer(step(codec.Rcpt("<a@b>")), reply) == reply.encode()
    assert conn.answer(step(codec.Mail("<a@b>")), Discard()) == b"\0\0\0\1d"
    skipping = opened(Needs(skip=True))
    assert skipping.answer(step(codec.Body(b"x")), Skip()) == b"\0\0\0\1s"


def test_end_of_message_edits_with_leading_space() -> None:
    conn = opened()  # HDR_LEADSPC negotiated: values get their space here
    edits = (
        AddHeader("X-Spam-Score", "1.5"),
        AddHeader("X-Tab", "\tkept"),
        ChangeHeader(1, "Authentication-Results", ""),
        Quarantine("held"),
    )
    out = conn.answer(step(codec.EndOfMessage()), Continue(), edits)
    assert out == (
        AddHeader("X-Spam-Score", " 1.5").encode()
        + AddHeader("X-Tab", "\tkept").encode()
        + ChangeHeader(1, "Authentication-Results", "").encode()
        + Quarantine("held").encode()
        + b"\0\0\0\1c"
    )
    plain = opened(Needs(leading_space=False))
    out = plain.answer(step(codec.EndOfMessage()), Continue(), (AddHeader("X", "v"),))
    assert out.startswith(AddHeader("X", "v").encode())
    limited = opened(Needs(actions=codec.Action.ADD_HEADERS))
    with pytest.raises(BadDecision):
        limited.answer(step(codec.EndOfMessage()), Continue(), (Quarantine("x"),))


def test_no_reply_events() -> None:
    conn = opened(Needs(no_reply=frozenset({Command.HEADER})))
    (header,) = conn.receive(mta_packet(b"L", cstrings("Subject", " hi")))
    assert not header.replies
    assert conn.answer(header, Continue()) == b""
    with pytest.raises(BadDecision):
        conn.answer(header, codec.Reject())


def test_bytes_after_quit_in_the_same_read_are_a_violation() -> None:
    conn = opened()
    (end,) = conn.receive(mta_packet(b"Q") + b"\x00junk")
    assert isinstance(end, End) and end.violation is not None
    assert end.violation.kind is Violation.AFTER_QUIT
    (clean,) = opened().receive(mta_packet(b"Q"))
    assert clean == End()
