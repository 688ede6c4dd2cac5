"""Reloads under load: good and broken rule files, many times, while mail flows.

No session may fail because of a reload: every message gets 250, a broken file
changes nothing, and a session keeps the policy it started with (both messages
of a session carry the same marker, though reloads happen between them).
bench/chaos.py does the same with SIGHUP against a separate process.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re

from tests.kit.sink import Sink

from ..conftest import GateFactory

POLICIES = {
    "A": "/^Subject:/ PREPEND X-Policy: A\n",
    "B": "/^Subject:/ PREPEND X-Policy: B\n",
    "broken": "/^Subject:( / PREPEND X-Policy: broken\n",
}
MARK = re.compile(rb"^X-Policy: (\w+)\r$", re.MULTILINE)


async def test_reloads_while_mail_flows(gate_factory: GateFactory, sink: Sink, tmp_path) -> None:
    rules = tmp_path / "header.regexp"
    rules.write_text(POLICIES["A"])
    gate = await gate_factory('[rules]\nheader = ["regexp:header.regexp"]\n')
    path = gate.server.config.path
    done = asyncio.Event()
    results: collections.Counter[bool] = collections.Counter()

    async def reloader() -> None:
        order = ["B", "broken", "A", "broken"]
        i = 0
        while not done.is_set():
            tmp = rules.with_suffix(".tmp")
            tmp.write_text(POLICIES[order[i % 4]])
            os.replace(tmp, rules)
            results[await gate.server.reload(path)] += 1
            i += 1
            await asyncio.sleep(0.03)

    def both_seen() -> bool:
        return {m for msg in sink.messages for m in MARK.findall(msg.content)} == {b"A", b"B"}

    async def client(n: int) -> list[int]:
        codes = []
        # Three sessions each, more (up to 10) until both policies were seen: the
        # clients start in step, and on a slow machine a whole round of them may
        # fall in the windows where A is in force.
        k = 0
        while k < 3 or (k < 10 and not both_seen()):
            await asyncio.sleep(0.007 * ((n * 5 + k) % 12))  # spread the starts
            c, banner = await gate.client(source=f"127.0.0.{2 + n}")
            codes.append(banner.code)
            codes.append((await c.cmd("EHLO c.test")).code)
            for m in range(2):  # two messages a session, reloads in between
                await asyncio.sleep(0.05)
                codes.append((await c.cmd("MAIL FROM:<a@example.org>")).code)
                codes.append((await c.cmd("RCPT TO:<u@example.test>")).code)
                codes.append((await c.cmd("DATA")).code)
                await c.send(b"Subject: s%d.%d m%d\r\n\r\nbody\r\n.\r\n" % (n, k, m))
                codes.append((await c.reply()).code)
            codes.append((await c.cmd("QUIT")).code)
            await c.close()
            k += 1
        return codes

    task = asyncio.create_task(reloader())
    codes = await asyncio.gather(*(client(n) for n in range(12)))
    done.set()
    await task
    assert {code for run in codes for code in run} == {220, 250, 354, 221}
    assert results[True] >= 5 and results[False] >= 5  # good and broken reloads
    sessions = sum(run.count(220) for run in codes)
    assert sessions >= 12 * 3
    assert len(sink.messages) == sessions * 2
    marks = [MARK.findall(m.content) for m in sink.messages]
    assert all(len(m) == 1 and m[0] in (b"A", b"B") for m in marks)
    assert {m[0] for m in marks} == {b"A", b"B"}
    # a session keeps its policy: its two messages carry the same marker
    by_session: dict[bytes, set[bytes]] = collections.defaultdict(set)
    for m in sink.messages:
        session = re.search(rb"^Subject: (s[\d.]+) m", m.content, re.MULTILINE)
        assert session is not None
        by_session[session.group(1)] |= set(MARK.findall(m.content))
    assert len(by_session) == sessions
    assert all(len(p) == 1 for p in by_session.values())
