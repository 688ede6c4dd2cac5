"""The flow tells observing checks how each transaction ended, off the reply path."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from spamgate import metrics
from spamgate.background import Background
from spamgate.model import Stage
from spamgate.pipeline.check import Check, CheckContext, TransactionEnd, TransactionObserver
from spamgate.pipeline.verdict import DUNNO, Verdict
from tests.kit.sink import Sink

from ..conftest import Gate, GateFactory

BODY = b"Subject: t\r\n\r\nhello\r\n"


class Recorder(Check, TransactionObserver):
    name = "recorder"
    stages = frozenset({Stage.RCPT})

    def __init__(self, fail: bool = False) -> None:
        self.events: list[TransactionEnd] = []
        self.fail = fail

    @classmethod
    def from_config(cls, config, services):  # type: ignore[override]
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        return DUNNO

    async def on_transaction_end(self, event: TransactionEnd) -> None:
        await asyncio.sleep(0)  # a store round trip
        self.events.append(event)
        if self.fail:
            raise RuntimeError("observer broke")


def observe(gate: Gate, *observers: Check) -> None:
    rt = gate.server.runtime
    rt.swap(dataclasses.replace(rt.policy, pipeline=rt.policy.pipeline.with_checks(observers)))


async def test_outcomes_reach_observers(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    rec = Recorder()
    observe(gate, rec)
    c, _ = await gate.client(source="127.0.0.5")  # not in mynetworks
    replies = await c.mail("a@example.org", ["u@example.test", "x@elsewhere.test"], BODY)
    assert [r.code for r in replies][-1] == 250
    await c.cmd("MAIL FROM:<b@example.org>")
    await c.cmd("RCPT TO:<x@elsewhere.test>")  # relay denied
    await c.cmd("RSET")
    await c.cmd("MAIL FROM:<c@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    await c.cmd("QUIT")
    await c.closed()
    await gate.server.app.background.drain()
    assert [(e.sender, e.outcome) for e in rec.events] == [
        ("a@example.org", "accepted"),
        ("b@example.org", "rejected"),
        ("c@example.org", "aborted"),
    ]
    first = rec.events[0]
    assert first.recipients == ("u@example.test",)
    assert str(first.client) == "127.0.0.5" and not first.trusted


async def test_observer_failure_is_logged_not_fatal(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    gate = await gate_factory()
    rec = Recorder(fail=True)
    observe(gate, rec)
    c, _ = await gate.client()
    for _ in range(2):
        replies = await c.mail("a@example.org", ["u@example.test"], BODY)
        assert replies[-1].code == 250
    await gate.server.app.background.drain()
    assert len(rec.events) == 2 and rec.events[0].trusted
    assert "recorder outcome failed" in caplog.text
    assert len(sink.messages) == 2


async def test_background_is_bounded_and_drains() -> None:
    bg = Background(max_pending=2)
    done: list[int] = []
    gate = asyncio.Event()

    async def job(i: int) -> None:
        await gate.wait()
        done.append(i)

    before = metrics.REGISTRY.get_sample_value("spamgate_background_dropped_total") or 0
    for i in range(3):
        bg.spawn(job(i), f"job {i}")
    assert len(bg) == 2
    assert metrics.REGISTRY.get_sample_value("spamgate_background_dropped_total") == before + 1
    gate.set()
    await bg.drain()
    assert sorted(done) == [0, 1] and len(bg) == 0


async def test_drain_cancels_what_outlives_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    bg = Background()
    bg.spawn(asyncio.sleep(30), "slow")
    with caplog.at_level(logging.ERROR):
        await bg.drain(timeout=0.05)
    assert len(bg) == 0
    assert "failed" not in caplog.text  # a cancellation is not a failure
