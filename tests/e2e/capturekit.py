"""What the capture and replay tests share: traffic to record, waiting for records,
replaying them, the CLI.

`TRAFFIC` is one session per line of the metrics tests' scripted setup
(`scripted`: rule tables at every stage, two DNS lists, SPF, DKIM and DMARC on
the test DNS server), each from a client address of its own so that every record
can be told apart by it. `EXPECTED` is what each gets, so a test that records it
knows it recorded the real thing.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from dataclasses import dataclass

from spamgate import app
from spamgate.replay.command import replay
from spamgate.replay.diff import Diff
from tests.e2e import scripted

from ..conftest import spamgate_cli


def body(subject: str = "hello", sender: str = "a@spf-pass.test") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <u@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@test>\r\n\r\nhello\r\n"
    ).encode()


@dataclass(frozen=True)
class Send:
    source: str
    sender: str
    rcpts: tuple[str, ...] = ("u@example.test",)
    content: bytes = b""
    helo: str = "client.example.test"

    @property
    def message(self) -> bytes:
        return self.content or body()


TRAFFIC = [
    # signed by spf-pass.test: SPF, DKIM and DMARC pass
    Send("127.0.0.20", "a@spf-pass.test", content=scripted.signed(body("clean"))),
    Send("127.0.0.2", "a@spf-pass.test"),  # both DNS lists: refused at RCPT
    Send("127.0.0.3", "a@spf-pass.test"),  # one DNS list (weight 1 of threshold 1)
    Send("127.0.0.9", "a@spf-pass.test"),  # client table REJECT
    Send("127.0.0.21", "a@spf-pass.test", helo="reject.example.test"),  # HELO table
    Send("127.0.0.22", "b@spf-fail.test"),  # SPF fail
    Send("127.0.0.23", "a@spf-pass.test", ("reject@example.test", "u@example.test")),
    Send("127.0.0.24", "a@spf-pass.test", ("defer@example.test",)),  # DEFER
    Send("127.0.0.25", "a@spf-pass.test", ("discard@example.test",)),  # DISCARD
    Send("127.0.0.26", "a@spf-pass.test", ("warn@example.test",)),  # WARN REJECT
    Send("127.0.0.27", "a@spf-pass.test", content=body("small score")),  # SCORE 2
    Send("127.0.0.28", "a@spf-pass.test", content=body("big score")),  # SCORE 20: refused
    Send("127.0.0.29", "a@spf-pass.test", content=body("reject-eod")),  # header REJECT
    Send("127.0.0.30", "a@spf-pass.test", ("x@elsewhere.test",)),  # relay denied
    # dmarc-none.test signed, then changed: DKIM and DMARC fail, p=none lets it in
    Send(
        "127.0.0.31",
        "a@dmarc-none.test",
        content=scripted.signed_then_changed(body("changed", "a@dmarc-none.test")),
    ),
    Send("127.0.0.33", "c@example.org"),  # From spf-pass.test unsigned: DMARC p=reject
    Send("127.0.0.34", "reject-mail@spf-fail.test"),  # sender table REJECT
]
# (the replies' codes: MAIL, each RCPT, the end or None) as spamgate gives them
EXPECTED = [
    (250, (250,), 250),
    (250, (554,), None),
    (250, (554,), None),
    (250, (554,), None),
    (250, (554,), None),
    (250, (550,), None),
    (250, (550, 250), 250),
    (250, (450,), None),
    (250, (250,), 250),
    (250, (250,), 250),
    (250, (250,), 250),
    (250, (250,), 550),
    (250, (250,), 550),
    (250, (554,), None),
    (250, (250,), 250),
    (250, (250,), 550),
    (250, (554,), None),
]


def capture_toml(directory: pathlib.Path, **settings: str) -> str:
    given = {"enabled": "true", "directory": f'"{directory}"', "min_free": "0", **settings}
    return "[capture]\n" + "".join(f"{k} = {v}\n" for k, v in given.items())


async def send(gate, s: Send) -> tuple[int, tuple[int, ...], int | None]:
    c, _ = await gate.client(source=s.source)
    replies = await c.mail(s.sender, list(s.rcpts), s.message, helo=s.helo)
    await c.cmd("QUIT")
    await c.close()
    codes = [r.code for r in replies]
    end = codes[-1] if codes[-2] == 354 else None
    return codes[1], tuple(codes[2 : 2 + len(s.rcpts)]), end


def lines(directory: pathlib.Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("capture-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


async def settled(directory: pathlib.Path, count: int, timeout: float = 10.0) -> list[dict]:
    """The records once `count` are written (the writer is a thread of its own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = lines(directory) if directory.exists() else []
        if len(found) >= count or loop.time() > deadline:
            return found
        await asyncio.sleep(0.02)


def config_of(gate_path: pathlib.Path, text: str | None = None):
    return app.loads(text if text is not None else gate_path.read_text(), str(gate_path))


async def replay_dir(config, directory: pathlib.Path, **kw) -> Diff:
    diff, error = await replay(config, [str(directory)], **kw)
    assert error is None, error
    return diff


def changes(diff: Diff) -> dict[str, tuple[str, str | None]]:
    """client address -> (class, rule) of every listed transaction."""
    out = {}
    for x in diff.listed:
        address = x["client"].rsplit("[", 1)[1].rstrip("]")
        out[address] = (x["class"], x["rule"])
    return out


cli = spamgate_cli
