"""What DNS lists and SPF cost: throughput through spamgate with them on and off.

    python -m bench.dns_checks [-n 2000] [-c 20] [--runs 3] [--dns nsd|python]

Everything runs on loopback, in separate processes: an authoritative DNS server
serving the zones below (a private NSD on a free port, so the server's own cost
stays small; or `--dns python`, the tests' responder, which also counts the
queries it gets), Postfix's smtp-sink as the upstream (or the tests' aiosmtpd sink
when smtp-sink is missing), spamgate itself (`python -m spamgate run`), and this
script as the client. Each transaction is one
connection (as at an MX: connect, EHLO, MAIL, RCPT, DATA, QUIT) from its own
127.x.y.z address, so the connect-stage DNSBL runs for every message. No client is
listed and every SPF check passes: the figures are the cost of checking good mail.

Scenarios, each run `--runs` times with fresh processes (the median is reported):

* off:  no DNS checks, no reverse lookup;
* cold: DNSBL with 3 zones and SPF (MAIL FROM through an include, and HELO); every
  message comes from a new address, sender domain and HELO name, so every lookup
  but the shared include misses the cache: 3 A + 2 TXT queries per message;
* warm: the same checks, with 50 clients, senders and HELO names that a warm-up
  pass has put in the cache: no query reaches the DNS server.

Columns: msgs/s (median, with the spread of the runs), the CPU time spamgate's
process spent per message (user + system, from /proc: far less sensitive than
msgs/s to other load on the machine), per-transaction latency, and the queries the
DNS server got per message (`--dns python` only; NSD does not count).

Bounded: at most 20,000 messages and 300 s per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kit.smtpclient import RawClient  # noqa: E402

MAX_MESSAGES = 20000
RUN_LIMIT = 300.0
POOL = 50  # warm scenario: clients, senders and HELO names that repeat
BODY = b"From: bench@example.org\r\nSubject: bench\r\n\r\n" + b"Hello, world.\r\n" * 20

ZONES = {
    "bl1.test": {"records": {}},
    "bl2.test": {"records": {}},
    "bl3.test": {"records": {}},
    # every sender domain and HELO name under spf.test publishes the same policy,
    # through an include shared by all (as big providers' _spf records are)
    "spf.test": {"records": {"*": {"TXT": "v=spf1 include:_spf.inc.test -all"}}},
    "inc.test": {"records": {"_spf": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}}},
}

CHECKS = """
[dnsbl]
sites = ["bl1.test=127.0.0.[2..11]*2", "bl2.test*1", "bl3.test=127.0.0.2*1"]
threshold = 2

[spf]
enabled = true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source(n: int) -> str:
    """The n-th client address: 127.1.0.0 upwards (all of 127/8 is on lo)."""
    n += 1
    return f"127.{1 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


@dataclass
class Procs:
    items: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, *args: str, ready: str | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.items.append(proc)
        if ready is not None:
            async with asyncio.timeout(10):
                while ready not in (await proc.stdout.readline()).decode():  # type: ignore[union-attr]
                    pass
        return proc

    async def stop(self) -> None:
        for proc in reversed(self.items):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(5):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        self.items.clear()


async def wait_port(port: int) -> None:
    async with asyncio.timeout(15):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def dns_queries(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGUSR1)
    async with asyncio.timeout(5):
        while True:
            line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
            if line.startswith("queries "):
                return int(line.split()[1])


async def transaction(port: int, n: int, warm: bool) -> float:
    i = n % POOL if warm else n
    started = time.perf_counter()
    c, banner = await RawClient.connect(port, source=source(i))
    if banner is None or banner.code != 220:
        raise RuntimeError(f"greeting {banner}")
    replies = await c.mail(
        f"user{i}@m{i}.spf.test", ["u@example.test"], BODY, helo=f"h{i}.spf.test"
    )
    if replies[-1].code != 250:
        raise RuntimeError(f"message {n}: {replies[-1]}")
    await c.cmd("QUIT")
    await c.close()
    return time.perf_counter() - started


async def load(port: int, count: int, concurrency: int, warm: bool, offset: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> float:
        async with gate:
            return await transaction(port, n, warm)

    async with asyncio.timeout(RUN_LIMIT):
        return await asyncio.gather(*(one(offset + n) for n in range(count)))


def nsd_files(tmp: Path, port: int) -> Path:
    """A private NSD (authoritative only) for ZONES on 127.0.0.1:`port`."""
    zones = tmp / "zones"
    zones.mkdir(exist_ok=True)
    conf = [
        "server:",
        f"    ip-address: 127.0.0.1@{port}",
        f"    port: {port}",
        "    do-ip6: no",
        "    server-count: 1",
        '    username: ""',
        '    chroot: ""',
        f'    zonesdir: "{zones}"',
        '    database: ""',
        f'    zonelistfile: "{tmp}/zone.list"',
        f'    xfrdfile: "{tmp}/xfrd.state"',
        f'    xfrdir: "{tmp}"',
        f'    pidfile: "{tmp}/nsd.pid"',
        f'    logfile: "{tmp}/nsd.log"',
        "    rrl-ratelimit: 0",  # every client is 127.0.0.1: no rate limiting
        "remote-control:",
        "    control-enable: no",
    ]
    for origin, zone in ZONES.items():
        lines = [
            f"$ORIGIN {origin}.",
            "$TTL 3600",
            "@ IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 3600",
            "@ IN NS ns.bench.test.",
        ]
        for owner, types in zone["records"].items():
            for rdtype, value in types.items():
                text = f'"{value}"' if rdtype == "TXT" else value
                lines.append(f"{owner} IN {rdtype} {text}")
        (zones / f"{origin}.zone").write_text("\n".join(lines) + "\n")
        conf += ["zone:", f'    name: "{origin}"', f'    zonefile: "{origin}.zone"']
    path = tmp / "nsd.conf"
    path.write_text("\n".join(conf) + "\n")
    return path


async def start_dns(procs: Procs, kind: str, tmp: Path, port: int):
    if kind == "nsd":
        await procs.start("nsd", "-d", "-c", str(nsd_files(tmp, port)))
        await wait_dns(port)
        return None
    zones = tmp / "zones.json"
    zones.write_text(json.dumps(ZONES))
    return await procs.start(
        sys.executable,
        "-m",
        "tests.kit.dnsserver",
        "--port",
        str(port),
        str(zones),
        ready="serving",
    )


async def wait_dns(port: int) -> None:
    import dns.asyncquery
    import dns.message

    query = dns.message.make_query("inc.test", "SOA")
    async with asyncio.timeout(10):
        while True:
            try:
                await dns.asyncquery.udp(query, "127.0.0.1", timeout=0.2, port=port)
                return
            except (OSError, dns.exception.Timeout):
                await asyncio.sleep(0.1)


async def run_once(scenario: str, count: int, concurrency: int, dns_kind: str, tmp: Path) -> dict:
    procs = Procs()
    try:
        dns_port, sink_port, gate_port = free_port(), free_port(), free_port()
        dns = await start_dns(procs, dns_kind, tmp, dns_port)
        smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if os.path.exists(smtp_sink):
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            await procs.start(smtp_sink, *user, f"127.0.0.1:{sink_port}", "1024")
        else:
            code = (
                "import asyncio\nfrom tests.kit.sink import Sink\n"
                "async def main():\n"
                f"    s = Sink(); s.port = {sink_port}\n"
                "    loop = asyncio.get_running_loop()\n"
                f"    await loop.create_server(s._factory, '127.0.0.1', {sink_port})\n"
                "    await asyncio.Event().wait()\n"
                "asyncio.run(main())\n"
            )
            await procs.start(sys.executable, "-c", code)
        await wait_port(sink_port)
        config = tmp / f"{scenario}.toml"
        config.write_text(
            f"""
[server]
listen = ["127.0.0.1:{gate_port}"]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = ["127.0.0.1/32"]

[upstream]
address = "127.0.0.1:{sink_port}"
xclient = false

[limits]
max_sessions = 10000

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
reverse_lookup = false
"""
            + ("" if scenario == "off" else CHECKS)
        )
        gate = await procs.start(
            sys.executable, "-m", "spamgate", "run", "-c", str(config), "--log-level", "warning"
        )
        await wait_port(gate_port)
        warm = scenario == "warm"
        if warm:
            await load(gate_port, POOL, concurrency, warm=True, offset=0)
        before = await dns_queries(dns) if dns else 0
        cpu_before = cpu_seconds(gate.pid)
        started = time.perf_counter()
        latencies = await load(gate_port, count, concurrency, warm, offset=POOL)
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(gate.pid)
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        queries = (await dns_queries(dns) - before) if dns else None
        latencies.sort()
        return {
            "rate": count / elapsed,
            "cpu": None if cpu is None else cpu / count * 1000,
            "p50": latencies[len(latencies) // 2] * 1000,
            "p95": latencies[int(len(latencies) * 0.95)] * 1000,
            "queries": None if queries is None else queries / count,
        }
    finally:
        await procs.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages per run (max 20000)")
    parser.add_argument("-c", type=int, default=20, help="concurrent connections")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument(
        "--scenarios", default="off,cold,warm", help="comma-separated: off, cold, warm"
    )
    parser.add_argument(
        "--dns",
        choices=("nsd", "python"),
        default="nsd" if shutil.which("nsd") else "python",
        help="the DNS server: NSD (default when installed) or the tests' responder",
    )
    args = parser.parse_args()
    count = max(1, min(args.n, MAX_MESSAGES))
    print(
        f"{count} messages per run, {args.c} connections, {args.runs} runs, "
        f"DNS server: {args.dns}; loopback only"
    )
    header = ("scenario", "msgs/s", "(min..max)", "CPU ms/msg", "p50 ms", "p95 ms", "DNS q/msg")
    print("{:<8} {:>7} {:>13} {:>10} {:>7} {:>7} {:>9}".format(*header))
    with tempfile.TemporaryDirectory(prefix="spamgate-bench-") as tmp:
        for scenario in args.scenarios.split(","):
            runs = [
                await run_once(scenario, count, args.c, args.dns, Path(tmp))
                for _ in range(args.runs)
            ]
            rates = [r["rate"] for r in runs]
            cpus = [r["cpu"] for r in runs if r["cpu"] is not None]
            mid = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
            row = (
                scenario,
                f"{statistics.median(rates):.0f}",
                f"({min(rates):.0f}..{max(rates):.0f})",
                f"{statistics.median(cpus):.2f}" if cpus else "-",
                f"{mid['p50']:.1f}",
                f"{mid['p95']:.1f}",
                "-" if mid["queries"] is None else f"{mid['queries']:.2f}",
            )
            print("{:<8} {:>7} {:>13} {:>10} {:>7} {:>7} {:>9}".format(*row), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
