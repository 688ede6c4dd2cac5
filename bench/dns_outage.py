"""How long a client waits for each reply while spamgate's resolver is down.

    python -m bench.dns_outage [-n 400] [-c 20] [--faults dead,black-hole] [--no-breaker]

spamgate (`python -m spamgate run`, the shipped `[dns]` defaults: 2 s per attempt,
5 s per lookup, the breaker after 5 unanswered queries, a probe a second) runs
with every DNS check on: the client's verified name, three DNS lists, SPF for HELO
and MAIL FROM, DKIM and DMARC on a signed message. Its only nameserver is

* dead: a loopback port nothing listens on (ICMP port unreachable), or
* black-hole: a UDP socket that takes every query and answers none.

The upstream is the tests' aiosmtpd sink, in this process. Each session is one
connection from its own 127.x.y.z address: greeting, EHLO, MAIL, RCPT, DATA, the
message; the time to each reply is recorded. The first `-c` sessions meet the
outage and open the breaker ("onset"); the `-n` sessions after them are the
outage as clients see it from then on ("outage"). `--no-breaker` runs the same
with `breaker_failures = 0` (spamgate as it was before the breaker), with `-c`
sessions only: each takes half a minute.

Columns, per phase: sessions, replies, the median, 99th percentile and largest
reply time, and how many replies took 1 s or more; "opened" is when spamgate
logged the nameserver down, from the first connection.

Bounded: at most 5,000 sessions and 300 s per fault.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dns_checks import Procs, free_port, source, wait_port  # noqa: E402
from tests.kit.dkimkeys import Signer, message  # noqa: E402
from tests.kit.sink import Sink  # noqa: E402
from tests.kit.smtpclient import RawClient  # noqa: E402

MAX_SESSIONS = 5000
RUN_LIMIT = 300.0
CHECKS = """
[dnsbl]
sites = ["bl1.test", "bl2.test", "bl3.test"]

[spf]
enabled = true

[dkim]
enabled = true

[dmarc]
enabled = true
"""


@contextlib.contextmanager
def nameserver(fault: str):
    """The address of a nameserver that is down in the way `fault` names."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if fault == "dead":
            s.close()  # nothing listens: the kernel answers port unreachable
        yield f"127.0.0.1:{port}"


async def session(port: int, n: int, signed: bytes) -> list[float]:
    """One session; the time each reply took, in seconds."""
    waits = []
    started = time.perf_counter()
    c, _ = await RawClient.connect(port, source=source(n), greet=False)
    banner = await c.reply(60)
    waits.append(time.perf_counter() - started)
    if banner is None or banner.code != 220:
        raise RuntimeError(f"session {n}: greeting {banner}")
    for line in (
        "EHLO mx.signed.test",
        "MAIL FROM:<alice@signed.test>",
        "RCPT TO:<u@example.test>",
    ):
        started = time.perf_counter()
        reply = await c.cmd(line, timeout=60)
        waits.append(time.perf_counter() - started)
        if reply.code != 250:
            raise RuntimeError(f"session {n}: {line}: {reply}")
    started = time.perf_counter()
    if (await c.cmd("DATA", timeout=60)).code != 354:
        raise RuntimeError(f"session {n}: DATA refused")
    waits.append(time.perf_counter() - started)
    started = time.perf_counter()
    await c.send(signed + b".\r\n")
    reply = await c.reply(60)
    waits.append(time.perf_counter() - started)
    if reply.code != 250:
        raise RuntimeError(f"session {n}: end of data: {reply}")
    await c.cmd("QUIT")
    await c.close()
    return waits


async def sessions(port: int, first: int, count: int, concurrency: int, signed: bytes):
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> list[float]:
        async with gate:
            return await session(port, n, signed)

    return await asyncio.gather(*(one(first + n) for n in range(count)))


def row(phase: str, results: list[list[float]]) -> str:
    waits = sorted(w for s in results for w in s)
    if not waits:
        return f"{phase:8} {0:>8}"
    p50 = waits[len(waits) // 2]
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    slow = sum(1 for w in waits if w >= 1.0)
    return (
        f"{phase:8} {len(results):>8} {len(waits):>8} {p50 * 1000:>8.1f} "
        f"{p99 * 1000:>8.1f} {waits[-1] * 1000:>8.1f} {slow:>8}"
    )


async def run(fault: str, count: int, concurrency: int, breaker: bool, tmp: Path) -> list[str]:
    procs = Procs()
    sink = Sink()
    await sink.start()
    signed = Signer("signed.test", "sel").sign(message("alice@signed.test"))
    try:
        with nameserver(fault) as address:
            port = free_port()
            config = tmp / f"{fault}.toml"
            config.write_text(
                f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = ["127.0.0.1/32"]

[upstream]
address = "{sink.address}"

[limits]
max_sessions = 10000

[dns]
nameservers = ["{address}"]
{"" if breaker else "breaker_failures = 0"}
"""
                + CHECKS
            )
            log = tmp / f"{fault}.log"
            with open(log, "wb") as err:
                gate = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "spamgate", "run", "-c", str(config),
                    cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=err,
                )  # fmt: skip
            procs.items.append(gate)
            await wait_port(port)
            async with asyncio.timeout(RUN_LIMIT):
                started = time.time()
                onset = await sessions(port, 0, concurrency, concurrency, signed)
                outage = (
                    await sessions(port, concurrency, count, concurrency, signed) if breaker else []
                )
            opened = ""
            for line in log.read_text().splitlines():
                if " is down: " in line:
                    stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
                    stamp += int(line[20:23]) / 1000
                    opened = f"   opened after {stamp - started:.1f}s"
                    break
            name = f"{fault}{'' if breaker else ' (no breaker)'}"
            return [f"{name}{opened}", row("onset", onset), row("outage", outage)]
    finally:
        await procs.stop()
        await sink.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="sessions after the onset")
    parser.add_argument("-c", type=int, default=20, help="concurrent sessions")
    parser.add_argument("--faults", default="dead,black-hole", help="dead, black-hole")
    parser.add_argument(
        "--no-breaker", action="store_true", help="breaker_failures = 0: as before the breaker"
    )
    args = parser.parse_args()
    count = max(1, min(args.n, MAX_SESSIONS))
    print(
        f"{'phase':8} {'sessions':>8} {'replies':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'>= 1 s':>8}   load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="spamgate-dns-outage-") as tmp:
        for fault in args.faults.split(","):
            for line in await run(fault, count, args.c, not args.no_breaker, Path(tmp)):
                print(line, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
