"""Playbooks for the session driver: given these events and this upstream, expect
these replies. No socket: the driver is fed the events a front end would feed it,
its upstream is a script, its checks a few lines of their own."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

import pytest

from spamgate.app import loads
from spamgate.background import Background
from spamgate.flow.disposal import Quarantine
from spamgate.flow.driver import EndOfMessage, SessionDriver
from spamgate.message import Message, Outgoing
from spamgate.model import Client, Session, Stage
from spamgate.pipeline.check import Check, CheckContext
from spamgate.pipeline.observer import Observer
from spamgate.pipeline.policy import Policy
from spamgate.pipeline.runner import CorePolicy, Pipeline
from spamgate.pipeline.verdict import DUNNO, Action, Symbol, Verdict, reject
from spamgate.reply import Reply
from spamgate.upstream.base import Upstream, UpstreamSession
from spamgate.upstream.dry import DryUpstream

CONFIG = """
[server]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = ["127.0.0.1/32"]
[scoring]
reject = 15
tag = 5
"""


class Script(Check):
    """What the playbooks need decided: a sender refused at MAIL (held for the first
    RCPT), a symbol for some recipients and for some subjects, a HOLD on demand."""

    name = "script"
    stages = frozenset({Stage.MAIL, Stage.RCPT, Stage.EOD})

    @classmethod
    def from_config(cls, config, services):  # type: ignore[override]
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        txn, rcpt = ctx.transaction, ctx.recipient
        if ctx.stage is Stage.MAIL and txn is not None and txn.mail_from.startswith("spammer@"):
            return reject("Sender blocked", 550, rule="script:sender")
        if ctx.stage is Stage.RCPT and rcpt is not None and rcpt.address.startswith("scored"):
            return Verdict(symbols=(Symbol("SCORED_RCPT", 10),))
        if ctx.stage is Stage.EOD and ctx.message is not None:
            subject = ctx.message.get_all("Subject")[0].unfolded()
            if "viagra" in subject:
                return Verdict(symbols=(Symbol("VIAGRA", 10),))
            if "hold me" in subject:
                return Verdict(Action.HOLD, rule="script:hold")
        return DUNNO


class ScriptedUpstream(Upstream, UpstreamSession):
    """An MTA that answers from a script and writes down what it was sent."""

    def __init__(self, rcpt: dict[str, Reply] | None = None) -> None:
        self.rcpt_replies = rcpt or {}
        self.sent: list[str] = []
        self.in_transaction = False

    async def open(self, client: Client) -> UpstreamSession:
        self.sent.append(f"(connect, XCLIENT ADDR={client.address})")
        return self

    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        self.sent.append(f"MAIL FROM:<{sender}>")
        self.in_transaction = True
        return Reply(250, "2.1.0", ("Ok",))

    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        self.sent.append(f"RCPT TO:<{recipient}>")
        return self.rcpt_replies.get(recipient, Reply(250, "2.1.5", ("Ok",)))

    async def data(self, content: Outgoing) -> Reply:
        self.sent.append(f"DATA ({content.size} bytes)")
        self.in_transaction = False
        return Reply(250, "2.0.0", ("Ok: queued as PLAYBOOK",))

    async def rset(self) -> None:
        if self.in_transaction:
            self.sent.append("RSET")
            self.in_transaction = False

    async def close(self) -> None:
        self.sent.append("QUIT")

    @property
    def usable(self) -> bool:
        return True


class Replies(Observer):
    """What the observer hook sees: every reply the driver gives, by event."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def reply(self, event: str, reply: Reply | None) -> None:
        self.seen.append((event, str(reply) if reply is not None else None))


def driver(upstream: Upstream, *, held: Upstream | None = None, observer=None) -> SessionDriver:
    config = loads(CONFIG)
    pipeline = Pipeline([Script()], CorePolicy.from_config(config))
    client = Client(ipaddress.ip_address("192.0.2.9"), 40000)
    return SessionDriver(
        Policy(config, pipeline, digest="playbook"),
        Session("PLAYBOOK", client),
        upstream=upstream,
        disposal=Quarantine(held or DryUpstream()),
        background=Background(),
        observer=observer,
    )


Step = Callable[[SessionDriver], Awaitable[object]]


def connect() -> Step:
    return lambda d: d.connect()


def helo(name: str) -> Step:
    return lambda d: d.helo(name, esmtp=True)


def mail(sender: str) -> Step:
    return lambda d: d.mail(sender, (), {})


def rcpt(recipient: str) -> Step:
    return lambda d: d.rcpt(recipient, ())


def data() -> Step:
    return lambda d: d.data()


def message(subject: str) -> Step:
    content = f"From: <a@example.org>\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()

    async def step(d: SessionDriver) -> Reply:
        return (await d.message(Message(content))).reply

    return step


def rset() -> Step:
    return lambda d: d.rset()


async def play(d: SessionDriver, playbook: list[tuple[Step, str | None]]) -> None:
    for n, (step, expected) in enumerate(playbook, 1):
        reply = await step(d)
        assert (str(reply) if reply is not None else None) == expected, f"step {n}"


async def test_a_whole_session(caplog: pytest.LogCaptureFixture) -> None:
    """Two transactions: a score refusal at the end of data after an upstream 4xx
    for one recipient, then a sender refusal held for the first RCPT."""
    caplog.set_level(logging.INFO, logger="spamgate.session")
    busy = Reply(450, "4.2.1", ("<busy@example.test>: Mailbox busy, try again later",))
    upstream = ScriptedUpstream(rcpt={"busy@example.test": busy})
    replies = Replies()
    d = driver(upstream, observer=replies)
    await play(
        d,
        [
            (connect(), None),  # the front end greets
            (helo("client.example.net"), None),  # the front end's 250
            (mail("a@example.org"), "250 2.1.0 Ok"),
            (rcpt("scored@example.test"), "250 2.1.5 Ok"),  # SCORED_RCPT: 10
            (rcpt("busy@example.test"), str(busy)),  # the upstream's own 4xx
            (rcpt("x@elsewhere.test"), "554 5.7.1 <x@elsewhere.test>: Relay access denied"),
            (data(), None),  # the front end's 354
            (message("viagra"), "550 5.7.1 Message refused as spam (score 20.0)"),
            (mail("spammer@example.org"), "250 2.1.0 Ok"),  # refused, but not yet
            (rcpt("u@example.test"), "550 5.7.1 Sender blocked"),
            (rcpt("v@example.test"), "550 5.7.1 Sender blocked"),
            (rset(), "250 2.0.0 Ok"),
        ],
    )
    await d.close("quit")
    # Refused content never reaches the upstream; a refused sender never does.
    assert upstream.sent == [
        "(connect, XCLIENT ADDR=192.0.2.9)",
        "MAIL FROM:<a@example.org>",
        "RCPT TO:<scored@example.test>",
        "RCPT TO:<busy@example.test>",
        "RSET",
        "QUIT",
    ]
    lines = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
    assert [line.split("outcome=")[1].split()[0] for line in lines] == ["rejected", "rejected"]
    assert "score=20.0" in lines[0] and "end=rset" in lines[1]
    assert ("message", "550 5.7.1 Message refused as spam (score 20.0)") in replies.seen
    assert [r for e, r in replies.seen if e == "rcpt"][-1] == "550 5.7.1 Sender blocked"


async def test_the_end_of_data_as_a_milter_needs_it() -> None:
    """With an upstream that accepts everything, the end of data is also a structured
    decision: the fields to add, top first, the forged ones to remove by name and
    occurrence, and a HOLD to apply; ABORT (rset) may come any number of times."""
    d = driver(DryUpstream())
    await play(
        d,
        [
            (connect(), None),
            (helo("client.example.net"), None),
            (mail("a@example.org"), "250 2.1.0 Ok"),
            (rcpt("scored@example.test"), "250 2.1.5 Ok"),
            (data(), None),
        ],
    )
    forged = (
        b"Authentication-Results: other.test; spf=pass\r\n"
        b"Authentication-Results: gate.test; dkim=pass\r\n"
        b"Subject: hello\r\n\r\nhi\r\n"
    )
    end = await d.message(Message(forged))
    assert isinstance(end, EndOfMessage)
    assert (end.decision, str(end.reply)) == ("accept", "250 2.0.0 Ok")
    assert [name for name, _ in end.added] == [
        "Authentication-Results",
        "X-Spam-Flag",
        "X-Spam-Score",
        "X-Spam-Symbols",
    ]
    assert end.added[0][1].startswith("gate.test")
    assert end.added[2] == ("X-Spam-Score", "10.0")
    assert end.removed == (("Authentication-Results", 2),)  # the one claiming to be ours
    for _ in range(3):  # Postfix's ABORT after each message, after RSET, at QUIT
        assert str(await d.rset()) == "250 2.0.0 Ok"
    await play(
        d,
        [
            (mail("b@example.org"), "250 2.1.0 Ok"),
            (rcpt("u@example.test"), "250 2.1.5 Ok"),
            (data(), None),
        ],
    )
    end = await d.message(Message(b"Subject: hold me\r\n\r\nhi\r\n"))
    assert (end.decision, end.rule, str(end.reply)) == ("hold", "script:hold", "250 2.0.0 Ok")
    await d.close("quit")
