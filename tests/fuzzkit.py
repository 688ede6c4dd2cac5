"""Hostile-session fuzzing: generated SMTP sessions over a real socket, with invariants.

A spamgate and a recording sink run on one event loop in a background thread; the
fuzzer drives them with blocking sockets, one session per example. After each
session it checks the promises spamgate makes to the internet:

* every reply is a well-formed SMTP reply;
* the server neither crashes nor hangs past its timeouts;
* the upstream holds exactly the messages whose final dot got a 2xx, no others;
* nothing the client sent changes the meaning of a command sent upstream (one
  ADDR= per XCLIENT, no CR/LF inside a command, MAIL/RCPT carry one path).

The same runner replays the regression corpus (tests/corpus/*.smtp), so a case
found by the fuzzer becomes plain test data.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from spamgate.config import loads
from spamgate.server import Server

from .sink import Sink

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9](?:[ -][\x20-\x7e\x80-\xff\t]*)?\r\n$")
MARKER = re.compile(rb"X-Fuzz-Id: (\d+)")

FUZZ_CONFIG = """
[server]
listen = ["127.0.0.1:0"]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = ["127.0.0.1/32"]

[upstream]
address = "{sink}"
command_timeout = 5
data_timeout = 5

[limits]
message_size = 200000
recipients = 20
idle_timeout = 2
data_timeout = 2
errors = 12
max_sessions = 200
sessions_per_client = 50
"""


class Harness:
    """spamgate + sink on a private loop in a thread, for blocking-socket clients."""

    def __init__(self, config: str = FUZZ_CONFIG) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.sink = Sink()
        self.server: Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        await self.sink.start()
        self.server = Server(loads(self.config.format(sink=self.sink.address)))
        await self.server.start()
        self.port = self.server.addresses[0][1]

    def start(self) -> Harness:
        self._thread.start()
        self._ready.wait(10)
        return self

    def call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace=0.2))
        self.call(self.sink.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def sessions_open(self) -> int:
        assert self.server is not None
        return len(self.server.runtime.sessions)


@dataclass
class Transcript:
    sent: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)  # raw reply lines
    accepted_ids: set[int] = field(default_factory=set)  # X-Fuzz-Id told 2xx after dot
    closed_by_server: bool = False


class Violation(AssertionError):
    pass


class Closed(Exception):
    """The server closed the connection; `replies` arrived before it did."""

    def __init__(self, replies: list[list[bytes]]) -> None:
        super().__init__("closed")
        self.replies = replies


def _read_replies(
    sock: socket.socket, buf: bytearray, deadline: float, expect: int | None = None
) -> list[list[bytes]]:
    """Read replies until `expect` of them arrived (or, with None, a quiet spell).

    Raises Closed when the server closes, Violation when it stops mid-reply or
    leaves expected replies unsent past the deadline (a hang).
    """
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    while True:
        while b"\r\n" in buf:
            idx = buf.index(b"\r\n") + 2
            line = bytes(buf[:idx])
            del buf[:idx]
            current.append(line)
            if len(line) >= 4 and line[3:4] != b"-":
                replies.append(current)
                current = []
        if expect is not None and len(replies) >= expect:
            return replies
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if expect is not None:
                raise Violation(f"server hung: {len(replies)} of {expect} replies")
            return replies
        try:
            sock.settimeout(remaining if expect is not None else min(0.15, remaining))
            data = sock.recv(65536)
        except TimeoutError:
            if expect is None:
                return replies
            continue
        except OSError:
            raise Closed(replies) from None
        if not data:
            if buf or current:
                raise Violation(f"server closed in the middle of a reply: {bytes(buf)!r}")
            raise Closed(replies)
        buf += data
        if b"\r\n" not in buf and len(buf) > 4096:
            raise Violation(f"overlong reply fragment: {bytes(buf[:100])!r}")


def run_session(port: int, steps: list[tuple[str, bytes]], *, idle: float = 2.0) -> Transcript:
    """Play `steps`; check reply syntax as we go and note which messages got a 2xx.

    Kinds: "send" (command bytes, possibly several pipelined), "data" (message
    content ending in CRLF.CRLF, with one X-Fuzz-Id header), "close" (hang up).
    A message counts as accepted when its content was sent right after a 354 and
    the first reply after it is 2xx.
    """
    t = Transcript()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    buf = bytearray()
    last_code = b""
    try:
        try:
            _check(t, _read_replies(sock, buf, time.monotonic() + 3, expect=1))
        except Closed as closed:
            _check(t, closed.replies)
            t.closed_by_server = True
            return t
        last_code = t.replies[-1][:3] if t.replies else b""
        for kind, data in steps:
            if kind == "close":
                break
            try:
                sock.sendall(data)
            except OSError:
                t.closed_by_server = True
                break
            t.sent.append(data)
            after_354 = last_code == b"354"
            if kind == "data" and after_354:
                expect: int | None = 1
            elif kind == "data":
                expect = None  # content read as commands: no fixed count
            else:
                expect = data.count(b"\n")
            try:
                replies = _read_replies(sock, buf, time.monotonic() + idle + 1.5, expect)
            except Closed as closed:
                replies = closed.replies
                t.closed_by_server = True
            _check(t, replies)
            if kind == "data" and after_354 and replies and replies[0][-1][:1] == b"2":
                t.accepted_ids.update(int(m) for m in MARKER.findall(data))
            if replies:
                last_code = replies[-1][-1][:3]
            if t.closed_by_server:
                break
    finally:
        sock.close()
    return t


def _check(t: Transcript, replies: list[list[bytes]]) -> None:
    for reply in replies:
        code = reply[0][:3]
        for line in reply:
            if not REPLY_LINE.match(line):
                raise Violation(f"malformed reply line {line!r}")
            if line[:3] != code:
                raise Violation(f"mixed codes in one reply {reply!r}")
        t.replies.extend(reply)


def check_upstream(sink: Sink, accepted_before: int, transcript: Transcript) -> None:
    """The sink holds exactly the messages the client was told 2xx for."""
    new = sink.messages[accepted_before:]
    got = set()
    for m in new:
        ids = MARKER.findall(m.content)
        if len(ids) != 1:
            raise Violation(f"upstream message without exactly one fuzz id: {m.content[:200]!r}")
        got.add(int(ids[0]))
    extra = got - transcript.accepted_ids
    if extra:
        raise Violation(f"upstream got messages the client was not told 2xx for: {extra}")
    if transcript.accepted_ids - got:
        raise Violation(f"client told 2xx but upstream lacks: {transcript.accepted_ids - got}")


def check_commands(commands: list[str]) -> None:
    """No upstream command line carries injected structure."""
    for cmd in commands:
        if "\r" in cmd or "\n" in cmd or "\x00" in cmd:
            raise Violation(f"control character in upstream command {cmd!r}")
        if cmd.startswith("XCLIENT "):
            attrs = cmd.split()[1:]
            names = [a.split("=", 1)[0] for a in attrs]
            if len(names) != len(set(names)) or any("=" not in a for a in attrs):
                raise Violation(f"XCLIENT attribute injection: {cmd!r}")
            addr = [a for a in attrs if a.startswith("ADDR=")]
            if addr != ["ADDR=127.0.0.1"]:
                raise Violation(f"XCLIENT ADDR not the real client: {cmd!r}")
        if cmd.startswith(("MAIL ", "RCPT ")) and cmd.count("<") < 1:
            raise Violation(f"path without brackets upstream: {cmd!r}")
