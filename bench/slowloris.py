"""Slowloris: 2,000 connections trickling a byte every few seconds; do good clients get through?

spamgate runs as its own process in front of Postfix's smtp-sink. Good clients
(bench/smtpload.py's transaction, one message per session, from 127.0.0.1) send
mail for a while on a quiet server, then again while 2,000 "tricklers" from 40
other loopback addresses (50 each, the default per-client limit) hold sessions
open: a third send a command line a byte at a time, a third get to DATA and then
send the message a byte at a time, a third say nothing at all. A trickler that
is cut off reconnects at once, as an attacker would. The figure is the good
clients' throughput with the tricklers against the quiet run.

Scenarios (`--scenarios`):
  default   default limits (max_sessions 5000): the tricklers all get in, and
            nothing is under stress; what 2,000 idle sessions cost.
  tight     max_sessions 1000, fewer than the tricklers: stress timeouts and
            min_data_rate (the defaults) cut the tricklers off.
  tight-off the same, with the stress timeouts and min_data_rate off: what the
            defences buy.
  tight-rate  as tight, plus [ratelimit] connections_per_ip = "20/1m" (the
            good clients are in mynetworks, which the rate limit exempts).

    python -m bench.slowloris
    python -m bench.slowloris --quick

Bounded: at most 3,000 tricklers and 120 s per measurement, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .proxy import ROOT, cpu_seconds, free_port, rss_mb, stop, wait_port
from .smtpload import SmtpFailure, message_body, one_transaction

SMTP_SINK = "/usr/sbin/smtp-sink"
MAX_TRICKLERS = 3000
MAX_SECONDS = 120.0
SCENARIOS = {
    "default": "",
    "tight": "[limits]\nmax_sessions = 1000\n",
    "tight-off": "[limits]\nmax_sessions = 1000\nstress_threshold = 0\nmin_data_rate = 0\n",
    "tight-rate": '[limits]\nmax_sessions = 1000\n[ratelimit]\nconnections_per_ip = "20/1m"\n',
}


def start_sink(port: int) -> subprocess.Popen:
    if not os.path.exists(SMTP_SINK):
        raise SystemExit(f"slowloris: {SMTP_SINK} not found (apt-get install postfix)")
    args = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else [])
    # -m: room for every DATA trickler's upstream session
    proc = subprocess.Popen([*args, "-m", "4000", f"127.0.0.1:{port}", "4096"])
    wait_port(port, proc, "smtp-sink")
    return proc


def start_spamgate(port: int, sink_port: int, work: Path, limits: str) -> subprocess.Popen:
    cfg = work / "spamgate.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.slow.test"\n'
        'relay_domains = ["example.test"]\nmynetworks = ["127.0.0.1/32"]\n'
        f'[upstream]\naddress = "127.0.0.1:{sink_port}"\n'
        "[dns]\nreverse_lookup = false\n"
        f"{limits}"
    )
    log = work / "spamgate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spamgate", "run", "-c", str(cfg), "--log-level", "warning"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_port(port, proc, "spamgate")
    return proc


@dataclass
class Tricklers:
    sessions: int = 0  # connections made (first ones and reconnects)
    refused: int = 0  # greeted with 421 (max_sessions, per client)
    cut: int = 0  # cut off by spamgate after the greeting
    open_now: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)


async def trickler(n: int, port: int, every: float, stop_at: asyncio.Event, t: Tricklers) -> None:
    """One attacker slot: trickle, get cut off, reconnect, until `stop_at`."""
    source = f"127.0.50.{1 + n % 40}"
    kind = ("command", "data", "silent")[n % 3]
    t.kinds[kind] += 1
    await asyncio.sleep(n * 0.003)  # ramp up over a few seconds
    while not stop_at.is_set():
        writer = None
        t.sessions += 1
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            greeting = await reader.readline()
            if not greeting.startswith(b"220"):
                t.refused += 1
                await asyncio.sleep(1)
                continue
            t.open_now += 1
            try:
                if kind == "data":
                    for line in (b"EHLO slow.test", b"MAIL FROM:<s@slow.test>"):
                        writer.write(line + b"\r\n")
                        await _until_reply(reader)
                    writer.write(b"RCPT TO:<u@example.test>\r\n")
                    await _until_reply(reader)
                    writer.write(b"DATA\r\n")
                    await _until_reply(reader)
                text = b"EHLO " + b"x" * 10_000 if kind == "command" else b"y" * 100_000
                i = 0
                while not stop_at.is_set():
                    if kind != "silent":
                        writer.write(text[i % len(text) : i % len(text) + 1])
                        i += 1
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(every):
                            if not await reader.read(1024):
                                break  # cut off
            finally:
                t.open_now -= 1
            if not stop_at.is_set():
                t.cut += 1
        except (OSError, ConnectionError):
            await asyncio.sleep(0.5)
        finally:
            if writer is not None:
                writer.close()


async def _until_reply(reader: asyncio.StreamReader) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        if len(line) < 4 or line[3:4] != b"-":
            return


@dataclass
class Good:
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


async def good_clients(port: int, clients: int, seconds: float) -> tuple[Good, float]:
    good = Good()
    body = message_body(2048)
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                latency = await asyncio.wait_for(one_transaction("127.0.0.1", port, body), 60)
                good.latencies.append(latency)
                good.sent += 1
            except (SmtpFailure, OSError, TimeoutError) as exc:
                good.failed += 1
                good.errors[str(exc) if isinstance(exc, SmtpFailure) else type(exc).__name__] += 1
                await asyncio.sleep(0.05)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return good, time.monotonic() - started


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def scenario(name: str, args, work: Path) -> list[str]:
    sink_port, port = free_port(), free_port()
    sink = start_sink(sink_port)
    gate = start_spamgate(port, sink_port, work, SCENARIOS[name])
    out = []
    try:
        await good_clients(port, 2, 2)  # warm-up
        cpu = cpu_seconds(gate.pid)
        quiet, quiet_s = await good_clients(port, args.clients, args.seconds)
        quiet_cpu = cpu_seconds(gate.pid) - cpu
        stop_at = asyncio.Event()
        t = Tricklers()
        tasks = [
            asyncio.create_task(trickler(i, port, args.every, stop_at, t))
            for i in range(args.tricklers)
        ]
        await asyncio.sleep(args.ramp)
        open_at_start = t.open_now
        rss = rss_mb(gate.pid)
        cpu = cpu_seconds(gate.pid)
        before = (t.sessions, t.cut, t.refused)
        loud, loud_s = await good_clients(port, args.clients, args.seconds)
        loud_cpu = cpu_seconds(gate.pid) - cpu
        during = (t.sessions - before[0], t.cut - before[1], t.refused - before[2])
        open_at_end = t.open_now
        stop_at.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        q_rate, l_rate = quiet.sent / quiet_s, loud.sent / loud_s
        out += [
            f"{name}: {SCENARIOS[name].strip().replace(chr(10), ' ') or 'default settings'}",
            f"  quiet:      {q_rate:7.1f} msg/s, p50 {pct(quiet.latencies, 50) * 1000:.0f} ms, "
            f"p99 {pct(quiet.latencies, 99) * 1000:.0f} ms, failed {quiet.failed}, "
            f"spamgate CPU {quiet_cpu / quiet_s:.0%}",
            f"  tricklers:  {l_rate:7.1f} msg/s, p50 {pct(loud.latencies, 50) * 1000:.0f} ms, "
            f"p99 {pct(loud.latencies, 99) * 1000:.0f} ms, failed {loud.failed} "
            f"{dict(loud.errors) or ''}, spamgate CPU {loud_cpu / loud_s:.0%}",
            f"  ratio {l_rate / q_rate:.0%}; tricklers open {open_at_start} after the ramp, "
            f"{open_at_end} at the end; during the measurement {during[0]} trickler "
            f"connections, {during[1]} cut off by spamgate, {during[2]} refused with 421; "
            f"spamgate RSS {rss:.0f} MB",
        ]
    finally:
        stop(gate)
        stop(sink)
    return out


async def main_async(args) -> None:
    lines = [
        f"slowloris bench: {args.tricklers} tricklers (a byte every {args.every:g} s, "
        f"from 40 addresses), {args.clients} good clients, {args.seconds:g} s per "
        f"measurement; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    ]
    for name in args.scenarios.split(","):
        with tempfile.TemporaryDirectory(prefix="sg-slow-") as tmp:
            lines += await scenario(name, args, Path(tmp))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tricklers", type=int, default=2000)
    p.add_argument("--every", type=float, default=3.0, help="seconds between trickled bytes")
    p.add_argument("--clients", type=int, default=10, help="good clients")
    p.add_argument("--seconds", type=float, default=40, help="per measurement")
    p.add_argument("--ramp", type=float, default=15, help="seconds for the tricklers to settle")
    p.add_argument("--scenarios", default="default,tight,tight-off")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.tricklers, args.seconds, args.ramp, args.scenarios = 300, 5, 3, "default"
    if not (1 <= args.tricklers <= MAX_TRICKLERS and 0 < args.seconds <= MAX_SECONDS):
        raise SystemExit("slowloris: tricklers 1..3000, seconds up to 120")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
