"""The milter protocol layer against a real Postfix (3.7 on Debian 12), through real SMTP.

A private Postfix (tests/kit/postfix.py) runs with `smtpd_milters` pointing at a port on
loopback; each test starts spamgate's milter server there with a recording handler
whose answers the test scripts, sends mail with a raw SMTP client from a loopback
address of its own, and checks what the client heard, what the handler saw, and
what Postfix did with the message (delivered, discarded, held, refused).
"""

from __future__ import annotations

import asyncio
import email
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

from spamgate.milter.codec import (
    AddHeader,
    ChangeHeader,
    Continue,
    Discard,
    Header,
    InsertHeader,
    Quarantine,
    ReplyCode,
    TempFail,
)
from spamgate.milter.handler import MessageDecision
from spamgate.milter.macros import postfix_lines
from spamgate.milter.negotiate import Needs
from tests.kit.milterkit import Recorder, running_milter
from tests.kit.postfix import PostfixInstance, free_port
from tests.kit.smtpclient import RawClient, Reply

from ..conftest import PostfixFactory

POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"


def milter_lines(port: int, *extra: str) -> list[str]:
    return [
        f"smtpd_milters = inet:127.0.0.1:{port}",
        "milter_protocol = 6",
        "milter_default_action = tempfail",
        # Above the 5 MB test message; spamgate's default proxy limit is 10 MB.
        "message_size_limit = 20000000",
        *extra,
    ]


class MilterPostfix:
    def __init__(self, postfix: PostfixInstance, port: int) -> None:
        self.postfix = postfix
        self.port = port


@pytest.fixture(scope="module")
def mp(postfix_factory: PostfixFactory) -> MilterPostfix:
    port = free_port()
    return MilterPostfix(postfix_factory(main_extra=milter_lines(port)), port)


def marker() -> str:
    return uuid.uuid4().hex


def message(mark: str, body: str = "Hello\r\n", extra: str = "") -> bytes:
    return (
        f"From: a@example.org\r\nTo: u@example.test\r\nSubject: {mark}\r\n{extra}\r\n{body}"
    ).encode()


def queue_id(reply: Reply) -> str:
    match = re.search(r"queued as ([0-9A-Za-z]+)", reply.text)
    assert match, f"no queue id in {reply}"
    return match.group(1)


async def send(
    postfix: PostfixInstance, source: str, body: bytes, rcpts: tuple[str, ...] = ("u@example.test",)
) -> list[Reply]:
    c, banner = await RawClient.connect(postfix.port, source=source)
    assert banner is not None and banner.code == 220
    replies = await c.mail("a@example.org", list(rcpts), body, helo="client.example.test")
    await c.cmd("QUIT")
    await c.close()
    return replies


async def delivered(postfix: PostfixInstance, mark: str) -> email.message.Message:
    raw = await asyncio.to_thread(postfix.wait_delivered, mark.encode())
    return email.message_from_bytes(raw)


def postqueue(postfix: PostfixInstance) -> list[dict]:
    out = subprocess.run(
        [POSTQUEUE, "-c", str(postfix.etc), "-j"], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


# -- negotiation and macros -------------------------------------------------------------


async def test_events_and_macros_at_each_stage(
    mp: MilterPostfix, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    mark = marker()
    caplog.set_level(logging.WARNING, "spamgate.milter")
    async with running_milter(recorder, port=mp.port):
        body = message(mark, "line one\r\n..dot line\r\n", extra="X-Folded: a\r\n\tb\r\n")
        replies = await send(mp.postfix, "127.0.0.21", body)
        assert [r.code for r in replies] == [250, 250, 250, 354, 250]
        (session,) = await recorder.closed_sessions(1)
    qid = queue_id(replies[-1])
    names = session.names()
    start = names.index("connect")
    assert names[start : start + 5] == ["connect", "helo", "mail", "rcpt", "data"]
    assert names[names.index("eoh") - 4 : names.index("eoh")] == ["header"] * 4
    # Postfix aborts after every message, and again at QUIT (smtpd's mail_reset)
    assert names[-4:] == ["body", "eom", "abort", "abort"]

    (connect,) = session.args("connect")
    assert connect.address == "127.0.0.21" and connect.ip is not None
    assert connect.hostname == "[127.0.0.21]"  # no verified name: Sendmail's form
    (conn_macros,) = session.macros_at("connect")
    assert conn_macros["j"] == "mx.example.test"
    assert conn_macros["{daemon_name}"] == "mx.example.test"
    assert conn_macros["{client_addr}"] == "127.0.0.21"
    assert conn_macros["{client_port}"] == str(connect.port)
    assert conn_macros["{client_name}"] == "unknown"
    assert conn_macros["{client_ptr}"] == "unknown"
    assert "{daemon_addr}" not in conn_macros  # our lists replaced Postfix's defaults
    assert session.args("helo")[0].name == "client.example.test"
    assert session.args("mail")[0].sender == "<a@example.org>"
    assert session.args("rcpt")[0].address == "u@example.test"
    assert session.macros_at("data") == [{"i": qid}]
    assert session.macros_at("eom") == [{"i": qid}]
    assert session.macros_at("mail") == [{}]  # no AUTH: {auth_*} are not sent at all

    # Postfix's own Received field is not shown; values keep the space after the colon
    headers = session.args("header")
    assert headers[0] == Header("From", " a@example.org")
    assert Header("X-Folded", " a\n\tb") in headers
    assert not any(h.name == "Received" for h in headers)
    # the body as Postfix queued it: CRLF, dots unstuffed
    assert session.body_bytes() == b"line one\r\n.dot line\r\n"
    msg = await delivered(mp.postfix, mark)
    assert msg["Subject"] == mark
    assert not caplog.records  # no missing macro, no refused option


async def test_macros_from_main_cf_when_not_negotiated(postfix_factory: PostfixFactory) -> None:
    """The fallback for an MTA that ignores SETSYMLIST: the lines `postfix_lines` gives."""
    port = free_port()
    postfix = postfix_factory(main_extra=milter_lines(port, *postfix_lines()))
    recorder = Recorder()
    async with running_milter(recorder, Needs(macros={}), port=port):
        replies = await send(postfix, "127.0.0.22", message(marker()))
        assert replies[-1].code == 250
        (session,) = await recorder.closed_sessions(1)
    (conn_macros,) = session.macros_at("connect")
    assert conn_macros["{client_addr}"] == "127.0.0.22"
    assert conn_macros["{client_ptr}"] == "unknown"
    assert conn_macros["{daemon_addr}"] == "127.0.0.1"  # Postfix's defaults are kept
    assert session.macros_at("eom")[0]["i"] == queue_id(replies[-1])


# -- decisions ------------------------------------------------------------------------------


async def test_header_add_insert_change_delete(mp: MilterPostfix) -> None:
    edits = (
        AddHeader("X-Spam-Score", "2.5"),
        InsertHeader(0, "X-Top", "inserted at 0"),
        InsertHeader(2, "X-Third", "inserted at 2"),
        ChangeHeader(1, "Subject", "[SPAM] rewritten"),
        ChangeHeader(2, "Authentication-Results", ""),  # the second one: a forgery
        AddHeader("X-Folded", "one\n\ttwo"),
    )
    recorder = Recorder(lambda n, a: MessageDecision(Continue(), edits) if n == "eom" else None)
    mark = marker()
    extra = "Authentication-Results: mx.example.test; genuine\r\n"
    extra += "Authentication-Results: mx.example.test; dkim=pass (forged)\r\n"
    async with running_milter(recorder, port=mp.port):
        replies = await send(
            mp.postfix, "127.0.0.23", message(mark, extra=f"X-Mark: {mark}\r\n" + extra)
        )
        assert replies[-1].code == 250
    raw = await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    head = raw.split(b"\n\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in head.splitlines() if not line[:1].isspace()]
    # Postfix's delivery agent adds Return-Path and Delivered-To above everything
    rest = names[names.index("X-Top") :]
    assert rest[:4] == ["X-Top", "Received", "X-Third", "From"]
    assert rest[-2:] == ["X-Spam-Score", "X-Folded"]
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "[SPAM] rewritten"
    assert msg.get_all("Authentication-Results") == ["mx.example.test; genuine"]
    assert msg["X-Spam-Score"] == "2.5"
    assert "X-Folded: one\n\ttwo\n" in raw.decode()


async def test_custom_refusals_reach_the_client(mp: MilterPostfix) -> None:
    def script(name: str, arg: object):
        if name == "rcpt" and arg.address == "spam@example.test":
            return ReplyCode(550, "5.7.1", ("Refused by rule spam-42", "100% sure, see x.test"))
        if name == "rcpt" and arg.address == "later@example.test":
            return TempFail()
        if name == "eom":
            return ReplyCode(554, "5.7.1", ("Message refused: score 12.5 over 10",))
        return None

    recorder = Recorder(script)
    async with running_milter(recorder, port=mp.port):
        c, _ = await RawClient.connect(mp.postfix.port, source="127.0.0.24")
        await c.cmd("EHLO client.example.test")
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
        r = await c.cmd("RCPT TO:<spam@example.test>")
        assert r.code == 550
        assert r.lines == ["5.7.1 Refused by rule spam-42", "5.7.1 100% sure, see x.test"]
        r = await c.cmd("RCPT TO:<later@example.test>")
        assert str(r) == "451 4.7.1 Service unavailable - try again later"
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(message(marker()) + b".\r\n")
        r = await c.reply()
        assert str(r) == "554 5.7.1 Message refused: score 12.5 over 10"
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
    line = await asyncio.to_thread(
        mp.postfix.wait_log, r"milter-reject: RCPT from .*127\.0\.0\.24.*"
    )
    assert "Refused by rule spam-42" in line.group(0)


async def test_tempfail_at_end_of_message(mp: MilterPostfix) -> None:
    recorder = Recorder(
        lambda n, a: (
            ReplyCode(451, "4.7.1", ("Try again later: greylisted",)) if n == "eom" else None
        )
    )
    async with running_milter(recorder, port=mp.port):
        replies = await send(mp.postfix, "127.0.0.25", message(marker()))
    assert str(replies[-1]) == "451 4.7.1 Try again later: greylisted"


async def test_discard(mp: MilterPostfix) -> None:
    recorder = Recorder(lambda n, a: Discard() if n == "eom" else None)
    mark = marker()
    async with running_milter(recorder, port=mp.port):
        replies = await send(mp.postfix, "127.0.0.26", message(mark))
    assert replies[-1].code == 250  # the client is told it was taken
    qid = queue_id(replies[-1])
    await asyncio.to_thread(mp.postfix.wait_log, rf"{qid}: milter-discard: END-OF-MESSAGE")
    await asyncio.sleep(0.5)
    assert not any(mark.encode() in m for m in mp.postfix.delivered())


async def test_quarantine_puts_the_message_on_hold(mp: MilterPostfix) -> None:
    edits = (AddHeader("X-Spam-Flag", "YES"), Quarantine("spamgate: score 15"))
    recorder = Recorder(lambda n, a: MessageDecision(Continue(), edits) if n == "eom" else None)
    mark = marker()
    async with running_milter(recorder, port=mp.port):
        replies = await send(mp.postfix, "127.0.0.27", message(mark))
    assert replies[-1].code == 250
    qid = queue_id(replies[-1])
    await asyncio.to_thread(mp.postfix.wait_log, rf"{qid}: milter-hold: END-OF-MESSAGE")
    held = [m for m in await asyncio.to_thread(postqueue, mp.postfix) if m["queue_id"] == qid]
    assert len(held) == 1 and held[0]["queue_name"] == "hold"
    content = subprocess.run(
        [POSTCAT, "-c", str(mp.postfix.etc), "-bh", "-q", qid], capture_output=True, text=True
    ).stdout
    assert f"Subject: {mark}" in content and "X-Spam-Flag: YES" in content
    assert not any(mark.encode() in m for m in mp.postfix.delivered())


async def test_multi_megabyte_body_arrives_in_chunks(mp: MilterPostfix) -> None:
    recorder = Recorder()
    mark = marker()
    line = b"y" * 998 + b"\r\n"
    body_text = line * 5000  # 5 MB
    async with running_milter(recorder, port=mp.port):
        replies = await send(mp.postfix, "127.0.0.28", message(mark, body_text.decode()))
        assert replies[-1].code == 250
        (session,) = await recorder.closed_sessions(1)
    chunks = session.args("body")
    assert len(chunks) == -(-len(body_text) // 65535)
    assert all(len(c) == 65535 for c in chunks[:-1])
    assert session.body_bytes() == body_text
    await delivered(mp.postfix, mark)


async def test_two_messages_and_an_abort_on_one_connection(mp: MilterPostfix) -> None:
    recorder = Recorder()
    marks = [marker(), marker()]
    async with running_milter(recorder, port=mp.port):
        c, _ = await RawClient.connect(mp.postfix.port, source="127.0.0.29")
        first = await c.mail("a@example.org", ["u@example.test"], message(marks[0]))
        assert first[-1].code == 250
        assert (await c.cmd("MAIL FROM:<b@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
        assert (await c.cmd("RSET")).code == 250
        second = await c.mail("c@example.org", ["u@example.test"], message(marks[1]))
        assert second[-1].code == 250
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
        (session,) = await recorder.closed_sessions(1)
    assert len(recorder.sessions) == 1  # one milter connection for the SMTP session
    senders = [m.address for m in session.args("mail")]
    assert senders == ["a@example.org", "b@example.org", "c@example.org"]
    names = session.names()
    assert names.count("eom") == 2 and names.count("connect") == 1
    # the RSET transaction ended with an abort before the next MAIL
    second_mail = [i for i, n in enumerate(names) if n == "mail"][1]
    third_mail = [i for i, n in enumerate(names) if n == "mail"][2]
    assert "abort" in names[second_mail:third_mail]
    for mark in marks:
        await delivered(mp.postfix, mark)


async def test_connect_refusal_is_worded_by_postfix(mp: MilterPostfix) -> None:
    """Why spamgate refuses at RCPT, not at connect: the client never sees our text."""
    recorder = Recorder(
        lambda n, a: ReplyCode(554, "5.7.1", ("our words",)) if n == "connect" else None
    )
    async with running_milter(recorder, port=mp.port):
        c, banner = await RawClient.connect(mp.postfix.port, source="127.0.0.30")
        assert str(banner) == "554 mx.example.test ESMTP not accepting connections"
        await c.close()


async def test_milter_killed_mid_session_gives_4xx(postfix_factory: PostfixFactory) -> None:
    port = free_port()
    postfix = postfix_factory(main_extra=milter_lines(port))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kit.milterproc", str(port)], stdout=subprocess.PIPE, env=env
    )
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert ready == b"ready\n"
        c, _ = await RawClient.connect(postfix.port, source="127.0.0.31")
        assert (await c.cmd("EHLO client.example.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        r = await c.cmd("RCPT TO:<u@example.test>")
        assert str(r) == "451 4.7.1 Service unavailable - try again later"
        r = await c.cmd("DATA")
        assert r.code // 100 in (4, 5) and r.code != 354  # nothing can be accepted
        await c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [m for m in postqueue(postfix)] == []  # nothing queued, nothing lost
