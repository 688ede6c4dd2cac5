"""A bounded SMTP load generator: raw asyncio, loopback only, one message a session.

Each transaction is what most MX traffic is: connect, greeting, EHLO, MAIL, one
RCPT, DATA, the message, QUIT. Its latency runs from connect() to the reply to
the final dot (the client's wait for "queued"); QUIT is not timed. Commands go in
lock-step, without PIPELINING, like smtp-source.

Bounded in every direction so that a mistake cannot turn it into a flood: at most
MAX_MESSAGES messages, MAX_SECONDS seconds, MAX_CLIENTS concurrent sessions, and
only to 127.0.0.0/8.

    python -m bench.smtpload 127.0.0.1:2525 --messages 2000 --clients 50
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import time
from dataclasses import dataclass, field

MAX_MESSAGES = 200_000
MAX_SECONDS = 300.0
MAX_CLIENTS = 500


class SmtpFailure(Exception):
    """An unexpected reply; the session is abandoned and counted as failed."""


@dataclass
class LoadResult:
    clients: int
    sent: int = 0
    failed: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: int) -> float:
        """Latency percentile in seconds (p in 1..99)."""
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1]


TEXT = (
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n",
    b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim\r\n",
    b"veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea\r\n",
    b"commodo consequat. Duis aute irure dolor in reprehenderit in voluptate.\r\n",
)


def message_body(size: int) -> bytes:
    """Plain text of about `size` bytes: 72-character CRLF lines, one in four ending
    a sentence (a line ending in "." costs the DATA reader an extra step)."""
    head = (
        b"From: Load <load@example.org>\r\nTo: <user@example.test>\r\n"
        b"Subject: load test\r\nMessage-ID: <load@example.org>\r\n\r\n"
    )
    lines: list[bytes] = []
    while len(head) + sum(map(len, lines)) < size:
        lines.append(TEXT[len(lines) % len(TEXT)])
    return head + b"".join(lines)


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise SmtpFailure(f"connection closed, wanted {code}")
        if line[3:4] != b"-":
            break
    if int(line[:3]) != code:
        raise SmtpFailure(line[:3].decode())


async def one_transaction(host: str, port: int, body: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, 220)
        writer.write(b"EHLO load.example.org\r\n")
        await _expect(reader, 250)
        writer.write(b"MAIL FROM:<load@example.org>\r\n")
        await _expect(reader, 250)
        writer.write(b"RCPT TO:<user@example.test>\r\n")
        await _expect(reader, 250)
        writer.write(b"DATA\r\n")
        await _expect(reader, 354)
        writer.write(body + b".\r\n")
        await writer.drain()
        await _expect(reader, 250)
        latency = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221)
        return latency
    finally:
        writer.close()


def check_bounds(host: str, messages: int, clients: int, seconds: float) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"smtpload: {host} is not a loopback address; refusing")
    if not 1 <= messages <= MAX_MESSAGES:
        raise SystemExit(f"smtpload: messages must be 1..{MAX_MESSAGES}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise SystemExit(f"smtpload: clients must be 1..{MAX_CLIENTS}")
    if not 0 < seconds <= MAX_SECONDS:
        raise SystemExit(f"smtpload: seconds must be in (0, {MAX_SECONDS:.0f}]")


async def run_load(
    host: str, port: int, *, messages: int, clients: int, seconds: float, body: bytes
) -> LoadResult:
    """Send up to `messages` messages over `clients` concurrent sessions, stopping
    new ones after `seconds`. Failures are counted, not retried."""
    check_bounds(host, messages, clients, seconds)
    result = LoadResult(clients=clients)
    remaining = messages
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            try:
                latency = await asyncio.wait_for(one_transaction(host, port, body), 60)
            except (SmtpFailure, OSError, TimeoutError) as exc:
                result.failed += 1
                key = str(exc) if isinstance(exc, SmtpFailure) else type(exc).__name__
                result.errors[key] = result.errors.get(key, 0) + 1
                continue
            result.sent += 1
            result.latencies.append(latency)

    started = time.perf_counter()
    async with asyncio.timeout(seconds + 90):
        await asyncio.gather(*(worker() for _ in range(clients)))
    result.elapsed = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port on loopback")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    r = asyncio.run(
        run_load(
            host,
            int(port),
            messages=args.messages,
            clients=args.clients,
            seconds=args.seconds,
            body=message_body(args.size),
        )
    )
    print(
        f"sent={r.sent} failed={r.failed} seconds={r.elapsed:.2f} msg/s={r.rate:.1f} "
        f"p50_ms={r.percentile(50) * 1000:.2f} p99_ms={r.percentile(99) * 1000:.2f}"
        + (f" errors={r.errors}" if r.errors else "")
    )


if __name__ == "__main__":
    main()
