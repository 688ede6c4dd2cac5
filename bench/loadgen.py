"""A light SMTP load generator: one message per session, timed per transaction.

Written as asyncio protocols (no streams) and run on uvloop when it is installed,
so that the generator's own CPU per message stays well below the servers' it
measures: on the two shared cores of the development machine, every millisecond
the generator spends is one the server under test does not get.

Each session is what most MX traffic is: connect, greeting, EHLO, MAIL, one RCPT,
DATA, the message, QUIT, commands in lock-step (no PIPELINING). A transaction's
latency runs from connect() to the reply to the final dot; QUIT is not timed.

Two ways to drive it:

* closed loop (`run_closed`): `clients` sessions at a time, each starting the next
  as soon as one ends: the most a server takes at that concurrency;
* open loop (`run_open`): a new session every 1/`rate` seconds whatever happens,
  up to `max_open` at once: latency at a given load.

Bounded: at most MAX_MESSAGES messages, MAX_SECONDS seconds, MAX_CLIENTS sessions
at once, and only to 127.0.0.0/8, from 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_MESSAGES = 200_000
MAX_SECONDS = 600.0
MAX_CLIENTS = 10_000

TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n",
    b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim\r\n",
    b"veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea\r\n",
    b"commodo consequat. Duis aute irure dolor in reprehenderit in voluptate.\r\n",
)


def message_body(size: int, sender: str, recipient: str) -> bytes:
    """Plain text of about `size` bytes in 72-character CRLF lines (one in four
    ends a sentence, so the DATA reader meets lines ending in a dot)."""
    head = (
        f"From: Load <{sender}>\r\nTo: <{recipient}>\r\nSubject: load test\r\n"
        "Message-ID: <load@good.test>\r\n\r\n"
    ).encode()
    lines: list[bytes] = []
    while len(head) + sum(map(len, lines)) < size:
        lines.append(TEXT[len(lines) % len(TEXT)])
    return head + b"".join(lines)


@dataclass(frozen=True)
class Script:
    """What each session says, and the reply code it expects before each line."""

    helo: str = "client.good.test"
    sender: str = "sender@good.test"
    recipient: str = "user@example.test"
    size: int = 2048
    content: bytes | None = None  # the message as sent (DKIM-signed, say); default: made
    # Close right after sending QUIT, without waiting for 221: the client's side then
    # holds the TIME_WAIT. Against a server that closes first after 221 (Postfix),
    # the generator's connect() may otherwise pick a port whose connection is still
    # in the server's TIME_WAIT, and that SYN waits out a one-second retransmission.
    close_first: bool = False

    def steps(self) -> list[tuple[int, bytes | None]]:
        body = self.content or message_body(self.size, self.sender, self.recipient)
        return [
            (220, f"EHLO {self.helo}\r\n".encode()),
            (250, f"MAIL FROM:<{self.sender}>\r\n".encode()),
            (250, f"RCPT TO:<{self.recipient}>\r\n".encode()),
            (250, b"DATA\r\n"),
            (354, body + b".\r\n"),
            (250, b"QUIT\r\n"),  # the reply to the dot: the transaction's end
            (221, None),
        ]


DOT_STEP = 5  # index of the step whose expected reply answers the final dot


@dataclass
class LoadResult:
    sent: int = 0
    failed: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0  # the generator's own CPU seconds

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in seconds (p in (0, 100))."""
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        cuts = statistics.quantiles(self.latencies, n=1000, method="inclusive")
        return cuts[min(len(cuts) - 1, max(0, round(p * 10) - 1))]

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


class _Session(asyncio.Protocol):
    """One session as a state machine over received reply lines."""

    def __init__(
        self, steps: list[tuple[int, bytes | None]], done: asyncio.Future, close_first: bool
    ) -> None:
        self.steps = steps
        self.close_first = close_first
        self.done = done
        self.step = 0
        self.buffer = b""
        self.started = time.perf_counter()
        self.latency: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if line[3:4] == b"-":
                continue  # a continuation line: wait for the last one
            self._reply(line)
            if self.done.done():
                return

    def _reply(self, line: bytes) -> None:
        expected, send = self.steps[self.step]
        try:
            code = int(line[:3])
        except ValueError:
            code = 0
        if code != expected:
            self._finish(f"{code} at step {self.step}")
            return
        if self.step == DOT_STEP:
            self.latency = time.perf_counter() - self.started
        self.step += 1
        if send is None:
            self._finish(None)
            return
        assert self.transport is not None
        self.transport.write(send)
        if self.close_first and self.step == DOT_STEP + 1:
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result((self.latency, error))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.latency is not None:  # delivered; the QUIT reply is not required
                self.done.set_result((self.latency, None))
            else:
                self.done.set_result((None, f"closed at step {self.step}"))


class Load:
    """Sessions against one server; `sources` are the client addresses, in turn."""

    def __init__(
        self,
        host: str,
        port: int,
        script: Script | None = None,
        sources: list[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        for address in [host, *(sources or [])]:
            if not ipaddress.ip_address(address).is_loopback:
                raise SystemExit(f"loadgen: {address} is not a loopback address; refusing")
        self.host, self.port = host, port
        script = script or Script()
        self.steps = script.steps()
        self.close_first = script.close_first
        self.sources = sources or []
        self.timeout = timeout
        self._next_source = 0

    async def session(self, result: LoadResult) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        local = None
        if self.sources:
            local = self.sources[self._next_source % len(self.sources)]
            self._next_source += 1
        transport = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await connect(
                    loop,
                    lambda: _Session(self.steps, done, self.close_first),
                    self.host,
                    self.port,
                    local,
                )
                latency, error = await done
        except (OSError, TimeoutError) as exc:
            if transport is not None:
                transport.close()
            result.fail(type(exc).__name__)
            return
        if error is not None or latency is None:
            result.fail(error or "no reply to the dot")
        else:
            result.sent += 1
            result.latencies.append(latency)

    async def run_closed(self, messages: int, clients: int, seconds: float) -> LoadResult:
        """`messages` sessions, `clients` at a time; no new one after `seconds`."""
        check_bounds(messages, clients, seconds)
        result = LoadResult()
        remaining = messages
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                await self.session(result)

        return await _timed(result, lambda: asyncio.gather(*(worker() for _ in range(clients))))

    async def run_open(self, rate: float, messages: int, max_open: int = 500) -> LoadResult:
        """One session every 1/`rate` s, `messages` in all; at most `max_open` at once
        (a session that would exceed it is counted as failed: the server fell behind)."""
        check_bounds(messages, max_open, messages / rate)
        result = LoadResult()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def drive() -> None:
            start = loop.time()
            for n in range(messages):
                delay = start + n / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(tasks) >= max_open:
                    result.fail("too many open sessions")
                    continue
                task = asyncio.ensure_future(self.session(result))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*tasks)

        return await _timed(result, drive)


# Linux: bind() to an address without choosing the port, which connect() then does.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    source: str | None,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """`create_connection`, from `source` if given, its port chosen at connect().

    `local_addr=(source, 0)` makes bind() choose the port, searching past every
    port in TIME_WAIT (thousands after a few runs, when the server does not close
    first); that search is a system call in the generator's event loop, so it
    showed up as the server's latency (p99 30-50 ms through spamgate, which
    races its client to close after 221, against 6-9 ms without it).
    """
    if source is None:
        return await loop.create_connection(factory, host, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await loop.create_connection(factory, sock=sock)


async def _timed(result: LoadResult, body: Callable) -> LoadResult:
    cpu, started = time.process_time(), time.perf_counter()
    async with asyncio.timeout(MAX_SECONDS):
        await body()
    result.elapsed = time.perf_counter() - started
    result.cpu = time.process_time() - cpu
    return result


def check_bounds(messages: int, clients: int, seconds: float) -> None:
    if not 1 <= messages <= MAX_MESSAGES:
        raise SystemExit(f"loadgen: messages must be 1..{MAX_MESSAGES}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise SystemExit(f"loadgen: clients must be 1..{MAX_CLIENTS}")
    if not 0 < seconds <= MAX_SECONDS:
        raise SystemExit(f"loadgen: a run must last at most {MAX_SECONDS:.0f} s")


class _Idle(asyncio.Protocol):
    """A session that says EHLO and then nothing: a spam client hanging on."""

    def __init__(self, helo: bytes, greeted: asyncio.Future) -> None:
        self.helo, self.greeted = helo, greeted
        self.transport: asyncio.Transport | None = None
        self.said_ehlo = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.said_ehlo and data.startswith(b"220"):
            self.said_ehlo = True
            self.transport.write(self.helo)
        elif self.said_ehlo and not self.greeted.done() and b"\n250 " in b"\n" + data:
            self.greeted.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.greeted.done():
            self.greeted.set_result(False)


async def hold_idle(
    host: str, port: int, count: int, sources: list[str], batch: int = 200
) -> list[asyncio.Transport]:
    """Open `count` sessions that greet and then sit idle; their transports (close
    them to end the sessions). Opened `batch` at a time, from `sources` in turn."""
    if not 1 <= count <= MAX_CLIENTS:
        raise SystemExit(f"loadgen: idle sessions must be 1..{MAX_CLIENTS}")
    loop = asyncio.get_running_loop()
    held: list[asyncio.Transport] = []

    async def one(n: int) -> None:
        greeted: asyncio.Future = loop.create_future()
        transport, _ = await connect(
            loop,
            lambda: _Idle(b"EHLO idle.good.test\r\n", greeted),
            host,
            port,
            sources[n % len(sources)],
        )
        held.append(transport)  # type: ignore[arg-type]
        async with asyncio.timeout(30):
            if not await greeted:
                raise ConnectionError(f"idle session {n} was closed before EHLO's reply")

    for first in range(0, count, batch):
        await asyncio.gather(*(one(n) for n in range(first, min(count, first + batch))))
    return held
