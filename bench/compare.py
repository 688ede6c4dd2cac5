"""spamgate against Haraka and against smtp-sink alone, side by side.

    python -m bench.compare                 # about 4 minutes; one table
    python -m bench.compare --quick         # a smoke run, under a minute
    python -m bench.compare --idle 5000     # and 5,000 idle sessions held meanwhile
    python -m bench.compare --workers 2     # spamgate with [server] workers = 2
    python -m bench.compare --capture       # spamgate with [capture] on (its cost)

Everything runs on loopback, from a mail lab: a directory (SPAMGATE_LAB) whose
`lab.sh start|stop|status SERVICE` runs NSD with the test zones (`dns`, on
127.0.0.1:5353: bl.test lists 127.0.0.2 and .3, good.test's SPF record allows
127.0.0.0/8, 127.0.0.1 has a forward-confirmed reverse name), Postfix's smtp-sink
(`sink`, 10026) and Haraka (`haraka`, 2526, forwarding to the sink), with
pidfiles under $LAB_STATE/run/ (default /tmp/spamgate-lab). Services that are not
running are started (Haraka with LAB_HARAKA_NODELAY=1, its fairest setting, unless
--haraka-stock) and stopped again at the end; running ones are used as they are. spamgate itself is
started here, as its own process, with the same checks as the lab's Haraka:

| check           | spamgate                                  | Haraka (lab)                 |
| --------------- | ----------------------------------------- | ---------------------------- |
| DNS list        | [dnsbl] sites = ["bl.test"]               | dns-list, zone bl.test       |
| SPF             | [spf] (MAIL FROM and HELO; fail: reject)  | spf (deny on MAIL FROM fail) |
| relay control   | relay_domains = ["example.test"]          | rcpt_to.in_host_list         |
| client name     | verified reverse name (FCrDNS)            | reverse lookup               |
| forwarding      | XCLIENT to smtp-sink, pooled connections  | smtp_forward to smtp-sink    |

The three targets are measured in turn, round after round (direct, spamgate,
Haraka, direct, ...), each round with the same closed-loop load (bench/loadgen.py:
`--clients` sessions at a time, one message each, EHLO, 2 KB). Figures per run:
msg/s, the CPU seconds the server under test used per 1,000 messages (all its
processes, from /proc), latency per transaction (connect to the reply to the dot,
p50/p99), and its peak RSS during the run (sampled). Ratios are taken pair by pair
within a round, then the median over rounds. Then latency at half of spamgate's
peak rate (open loop, the same rate for each target): spamgate's added p99 is its
p99 minus the direct p99 at that rate. With --idle N, N sessions from several
loopback addresses greet, say EHLO and hang on while good clients send mail
through spamgate: its RSS with them held, and the good clients' throughput as a
share of the same load without them (measured just before).

Bounded: at most --messages (≤ 20,000) messages and --seconds (≤ 120 s) per run,
at most 10 rounds, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loadgen import Load, LoadResult, Script, hold_idle

ROOT = Path(__file__).resolve().parents[1]
LAB = Path(os.environ.get("SPAMGATE_LAB", "lab"))
LAB_STATE = Path(os.environ.get("LAB_STATE", "/tmp/spamgate-lab"))
SINK_PORT, HARAKA_PORT, DNS = 10026, 2526, "127.0.0.1:5353"
MAX_RUN_MESSAGES, MAX_RUN_SECONDS, MAX_ROUNDS = 20_000, 120.0, 10
PIDFILES = {"sink": "sink/smtp-sink.pid", "haraka": "haraka/haraka.pid", "dns": "dns/nsd.pid"}

# The targets this benchmark was built to check (bench/README.md).
RATE_VS_HARAKA, RATE_VS_DIRECT, CPU_VS_HARAKA = 2.0, 0.30, 0.5
IDLE_RSS_MB, IDLE_SHARE, ADDED_P99_MS = 400.0, 0.80, 5.0


# -- processes ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def family(pid: int) -> list[int]:
    """`pid` and its descendants (worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo += [int(c) for c in children]
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class Lab:
    """The mail lab's services: started if needed, stopped if we started them."""

    def __init__(self, path: Path, haraka_stock: bool) -> None:
        self.path = path
        self.env = {**os.environ, "LAB_HARAKA_NODELAY": "0" if haraka_stock else "1"}
        self.started: list[str] = []

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.path / "lab.sh"), *args], env=self.env, capture_output=True, text=True
        )

    def ensure(self, services: list[str]) -> None:
        if not (self.path / "lab.sh").exists():
            raise SystemExit(
                f"bench: no mail lab at {self.path}: set SPAMGATE_LAB to its directory"
            )
        for service in services:
            if self.script("status", service).returncode != 0:
                out = self.script("start", service)
                if out.returncode != 0:
                    raise SystemExit(f"bench: lab.sh start {service} failed:\n{out.stderr}")
                self.started.append(service)

    def stop(self) -> None:
        for service in reversed(self.started):
            self.script("stop", service)
        self.started.clear()

    def pid(self, service: str) -> int:
        return int((LAB_STATE / "run" / PIDFILES[service]).read_text().split()[0])

    def haraka_setting(self) -> str:
        """How the running Haraka was started (its environment says)."""
        try:
            env = Path(f"/proc/{self.pid('haraka')}/environ").read_bytes().split(b"\0")
        except OSError:
            return "unknown"
        nodelay = b"LAB_HARAKA_NODELAY=1" in env
        nodes = next(
            (e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"HARAKA_NODES=")), "0"
        )
        return f"{'TCP_NODELAY' if nodelay else 'stock (Nagle on)'}, nodes={nodes}"


SPAMGATE_CONFIG = """\
# generated by bench/compare.py: the lab Haraka's checks
[server]
listen = ["127.0.0.1:{port}"]
hostname = "gate.bench.test"
relay_domains = ["example.test"]
mynetworks = []          # the load comes from 127/8: check it like any client
quarantine = "{workdir}/quarantine"
reload_interval = 0
workers = {workers}

[upstream]
address = "127.0.0.1:{sink}"
pool_size = 64           # smtp-sink takes XCLIENT again on a used connection

[limits]
max_sessions = {max_sessions}
sessions_per_client = {max_sessions}

[dns]
nameservers = ["{dns}"]

[dnsbl]
sites = ["bl.test"]

[spf]
enabled = true
"""

# --capture: every transaction recorded, as a site tuning its rules would run it.
CAPTURE_CONFIG = """
[capture]
enabled = true
directory = "{workdir}/capture"
"""


class Spamgate:
    def __init__(
        self, workdir: Path, workers: int, max_sessions: int, capture: bool = False
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "spamgate.toml"
        text = SPAMGATE_CONFIG.format(
            port=self.port,
            workdir=workdir,
            workers=workers,
            sink=SINK_PORT,
            dns=DNS,
            max_sessions=max_sessions,
        )
        if capture:
            text += CAPTURE_CONFIG.format(workdir=workdir)
        self.config.write_text(text)
        self.log = workdir / "spamgate.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spamgate", "run", "-c", str(self.config)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: spamgate exited:\n{self.log.read_text()[-2000:]}")
            if "listening on" in self.log.read_text():
                return
            time.sleep(0.05)
        raise SystemExit(f"bench: spamgate did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pids(self) -> list[int]:
        assert self.proc is not None
        return family(self.proc.pid)


# -- runs --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    pids: Callable[[], list[int]]  # the server under test's processes


@dataclass
class Run:
    target: str
    round: int
    result: LoadResult
    cpu: float  # server CPU seconds during the run
    peak_rss: float  # MB, sampled

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu / self.result.sent if self.result.sent else float("nan")


async def measure(
    target: Target, job: Coroutine[Any, Any, LoadResult]
) -> tuple[LoadResult, float, float]:
    """Run `job` (a coroutine making the load); the server's CPU and peak RSS."""
    pids = target.pids()
    peak = rss_mb(pids)
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mb(target.pids()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    sampler = asyncio.ensure_future(sample())
    before = cpu_seconds(pids)
    try:
        result = await job
    finally:
        stop.set()
        await sampler
    return result, cpu_seconds(target.pids()) - before, peak


@dataclass
class Bench:
    args: argparse.Namespace
    targets: list[Target]
    runs: list[Run] = field(default_factory=list)
    latency: list[tuple[str, int, LoadResult]] = field(default_factory=list)
    idle: dict[str, float] = field(default_factory=dict)

    def load(self, target: Target) -> Load:
        return Load("127.0.0.1", target.port, Script(size=self.args.size), self.args.sources)

    async def closed(self, target: Target, messages: int) -> tuple[LoadResult, float, float]:
        job = self.load(target).run_closed(messages, self.args.clients, self.args.seconds)
        return await measure(target, job)

    async def warm_up(self) -> None:
        for target in self.targets:
            result = await self.load(target).run_closed(200, self.args.clients, 30)
            if result.failed:
                raise SystemExit(f"bench: warm-up of {target.name} failed: {result.errors}")

    async def rounds(self) -> None:
        for n in range(self.args.rounds):
            for target in self.targets:
                result, cpu, peak = await self.closed(target, self.args.messages)
                self.runs.append(Run(target.name, n, result, cpu, peak))
                print(
                    f"  round {n + 1} {target.name:<9} {result.rate:7.1f} msg/s, "
                    f"{1000 * cpu / max(result.sent, 1):6.2f} CPU s/1000, "
                    f"load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                )

    def median_rate(self, name: str) -> float:
        return statistics.median(r.result.rate for r in self.runs if r.target == name)

    async def half_peak(self) -> float:
        rate = self.median_rate("spamgate") / 2
        messages = min(MAX_RUN_MESSAGES, max(200, int(rate * self.args.latency_seconds)))
        for n in range(self.args.latency_rounds):
            for target in self.targets:
                job = self.load(target).run_open(rate, messages)
                result, _, _ = await measure(target, job)
                self.latency.append((target.name, n, result))
        return rate

    async def idle_phase(self, spamgate: Target) -> None:
        count = self.args.idle
        sources = [f"127.0.2.{n}" for n in range(1, 11)]  # ten idle "clients"
        before, _, _ = await self.closed(spamgate, self.args.messages)
        rss_before = rss_mb(spamgate.pids())
        started = time.monotonic()
        held = await hold_idle("127.0.0.1", spamgate.port, count, sources)
        opened = time.monotonic() - started
        await asyncio.sleep(1)
        rss_held = rss_mb(spamgate.pids())
        during, cpu, peak = await self.closed(spamgate, self.args.messages)
        for transport in held:
            transport.close()
        self.idle = {
            "count": count,
            "rss_before": rss_before,
            "rss_held": rss_held,
            "peak": peak,
            "open_s": opened,
            "rate_before": before.rate,
            "rate_during": during.rate,
            "p99_during": during.percentile(99) * 1000,
            "cpu_per_1000": 1000 * cpu / max(during.sent, 1),
            "failed": during.failed + before.failed,
        }


# -- the table ---------------------------------------------------------------------


def fmt_ratio(values: list[float], target: float, higher: bool = True) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    ok = med >= target if higher else med <= target
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{med:.2f}{spread} {'ok' if ok else 'MISSED'}"


def table(bench: Bench, haraka_setting: str, half_rate: float, loads: tuple) -> str:
    a = bench.args
    names = [t.name for t in bench.targets]
    out = [
        f"spamgate vs Haraka vs smtp-sink: {a.rounds} rounds x {a.messages} messages, "
        f"{a.clients} clients, {a.size}-byte messages, one message per session (EHLO), "
        f"loopback, {len(a.sources)} client address(es); spamgate workers={a.workers}"
        f"{', [capture] on' if a.capture else ''}; "
        f"Haraka {haraka_setting}",
        f"machine: {os.cpu_count()} CPUs, load average {loads[0]:.2f} at start, "
        f"{loads[1]:.2f} at the end; load generator: bench/loadgen.py (uvloop)",
        "",
        f"{'target':<10}{'msg/s':>9}{'CPU s/1000':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'peak RSS MB':>13}{'failed':>8}   (median of the rounds; range)",
    ]
    for name in names:
        runs = [r for r in bench.runs if r.target == name]
        if not runs:
            continue
        rates = [r.result.rate for r in runs]
        cpus = [r.cpu_per_1000 for r in runs]
        out.append(
            f"{name:<10}{statistics.median(rates):>9.1f}{statistics.median(cpus):>12.2f}"
            f"{statistics.median(r.result.percentile(50) * 1000 for r in runs):>9.2f}"
            f"{statistics.median(r.result.percentile(99) * 1000 for r in runs):>9.2f}"
            f"{max(r.peak_rss for r in runs):>13.1f}{sum(r.result.failed for r in runs):>8}"
            f"   msg/s {min(rates):.0f}-{max(rates):.0f}, CPU {min(cpus):.2f}-{max(cpus):.2f}"
        )
    out.append("")

    def pairs(f: Callable[[dict[str, Run]], float]) -> list[float]:
        values = []
        for n in range(a.rounds):
            by = {r.target: r for r in bench.runs if r.round == n}
            with contextlib.suppress(KeyError, ZeroDivisionError):
                values.append(f(by))
        return values

    out.append("ratios, pair by pair within each round (median, range), and the targets:")
    if "haraka" in names:
        out.append(
            "  spamgate/Haraka msg/s       "
            + fmt_ratio(pairs(lambda b: b["spamgate"].result.rate / b["haraka"].result.rate), 2.0)
            + f"   (target >= {RATE_VS_HARAKA:.1f})"
        )
        out.append(
            "  spamgate/Haraka CPU per msg "
            + fmt_ratio(
                pairs(lambda b: b["spamgate"].cpu_per_1000 / b["haraka"].cpu_per_1000),
                CPU_VS_HARAKA,
                higher=False,
            )
            + f"   (target <= {CPU_VS_HARAKA:.2f})"
        )
    out.append(
        "  spamgate/direct msg/s       "
        + fmt_ratio(
            pairs(lambda b: b["spamgate"].result.rate / b["direct"].result.rate), RATE_VS_DIRECT
        )
        + f"   (target >= {RATE_VS_DIRECT:.2f})"
    )
    if bench.latency:
        out += ["", f"latency at half of spamgate's peak: {half_rate:.0f} msg/s, open loop"]
        out.append(f"{'target':<10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
        for name in names:
            got = [r for t, _, r in bench.latency if t == name]
            if got:
                out.append(
                    f"{name:<10}"
                    f"{statistics.median(r.percentile(50) * 1000 for r in got):>9.2f}"
                    f"{statistics.median(r.percentile(99) * 1000 for r in got):>9.2f}"
                    f"{sum(r.failed for r in got):>8}"
                )
        added = []
        for n in range(a.latency_rounds):
            by = {t: r for t, m, r in bench.latency if m == n}
            if "spamgate" in by and "direct" in by:
                added.append(1000 * (by["spamgate"].percentile(99) - by["direct"].percentile(99)))
        if added:
            med = statistics.median(added)
            out.append(
                f"  spamgate's added p99: {med:.2f} ms (rounds: "
                + ", ".join(f"{x:.2f}" for x in added)
                + f")   target < {ADDED_P99_MS:.0f} ms: {'ok' if med < ADDED_P99_MS else 'MISSED'}"
            )
    if bench.idle:
        i = bench.idle
        share = i["rate_during"] / i["rate_before"] if i["rate_before"] else 0.0
        out += [
            "",
            f"{i['count']:.0f} idle sessions (EHLO, then silence) held from 10 addresses, "
            f"opened in {i['open_s']:.1f} s:",
            f"  spamgate RSS {i['rss_before']:.1f} MB before, {i['rss_held']:.1f} MB with them "
            f"held, {i['peak']:.1f} MB peak under load   target < {IDLE_RSS_MB:.0f} MB: "
            f"{'ok' if i['peak'] < IDLE_RSS_MB else 'MISSED'}",
            f"  good clients: {i['rate_during']:.1f} msg/s with them vs {i['rate_before']:.1f} "
            f"without = {share:.0%}   target >= {IDLE_SHARE:.0%}: "
            f"{'ok' if share >= IDLE_SHARE else 'MISSED'}; p99 {i['p99_during']:.1f} ms, "
            f"{i['cpu_per_1000']:.2f} CPU s/1000, {i['failed']:.0f} failed",
        ]
    return "\n".join(out)


# -- main --------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of direct, spamgate, Haraka")
    p.add_argument("--messages", type=int, default=3000, help="messages per run")
    p.add_argument("--clients", type=int, default=20, help="sessions at a time")
    p.add_argument("--seconds", type=float, default=60, help="time limit per run")
    p.add_argument("--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--workers", type=int, default=1, help="spamgate [server] workers")
    p.add_argument("--sources", type=int, default=1, help="client addresses (127.1.x.y)")
    p.add_argument("--idle", type=int, default=0, help="idle sessions for the idle phase")
    p.add_argument("--latency-rounds", type=int, default=3, help="0: no half-peak phase")
    p.add_argument("--latency-seconds", type=float, default=8, help="length of each")
    p.add_argument("--no-haraka", action="store_true", help="direct and spamgate only")
    p.add_argument("--haraka-stock", action="store_true", help="Haraka without TCP_NODELAY")
    p.add_argument("--quick", action="store_true", help="2 rounds of 500: a smoke run")
    p.add_argument("--capture", action="store_true", help="spamgate with [capture] on")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.messages, a.latency_rounds, a.latency_seconds = 2, 500, 1, 3
    if not (1 <= a.rounds <= MAX_ROUNDS and 1 <= a.messages <= MAX_RUN_MESSAGES):
        p.error(f"at most {MAX_ROUNDS} rounds of {MAX_RUN_MESSAGES} messages")
    if not 0 < a.seconds <= MAX_RUN_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_RUN_SECONDS:.0f}]")
    n = max(1, a.sources)
    a.sources = ["127.0.0.1"] if n == 1 else [f"127.1.{k // 250}.{k % 250 + 1}" for k in range(n)]
    return a


async def main_async(a: argparse.Namespace, lab: Lab, gate: Spamgate) -> str:
    targets = [
        Target("direct", SINK_PORT, lambda: [lab.pid("sink")]),
        Target("spamgate", gate.port, gate.pids),
    ]
    if not a.no_haraka:
        targets.append(Target("haraka", HARAKA_PORT, lambda: family(lab.pid("haraka"))))
    bench = Bench(a, targets)
    loads = [os.getloadavg()[0]]
    print("bench: warm-up", file=sys.stderr)
    await bench.warm_up()
    await bench.rounds()
    half = 0.0
    if a.latency_rounds:
        print("bench: latency at half of spamgate's peak", file=sys.stderr)
        half = await bench.half_peak()
    if a.idle:
        print(f"bench: {a.idle} idle sessions", file=sys.stderr)
        await bench.idle_phase(targets[1])
    loads.append(os.getloadavg()[0])
    setting = "not run" if a.no_haraka else lab.haraka_setting()
    return table(bench, setting, half, tuple(loads))


def main() -> None:
    a = parse()
    if shutil.which("smtp-sink") is None and not Path("/usr/sbin/smtp-sink").exists():
        raise SystemExit("bench: smtp-sink not found (apt-get install postfix)")
    lab = Lab(LAB, a.haraka_stock)
    gate = None
    try:
        lab.ensure(["dns", "sink"] + ([] if a.no_haraka else ["haraka"]))
        with tempfile.TemporaryDirectory(prefix="sg-compare-") as tmp:
            gate = Spamgate(Path(tmp), a.workers, max(1000, a.idle + 500), a.capture)
            gate.start()
            try:
                loop_factory = _uvloop()
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    text = runner.run(main_async(a, lab, gate))
            finally:
                gate.stop()
            log = gate.log.read_text()
            problems = re.findall(r".*(?:ERROR|Traceback).*", log)
            if a.capture:
                text += "\n" + capture_summary(Path(tmp) / "capture")
    finally:
        lab.stop()
    print(text)
    if problems:
        print(f"\nspamgate logged {len(problems)} errors, the first: {problems[0]}")


def capture_summary(directory: Path) -> str:
    """How many records the capture wrote (plain and compressed files)."""
    import gzip

    records, size, names = 0, 0, sorted(directory.glob("capture-*"))
    for path in names:
        size += path.stat().st_size
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            records += sum(1 for _ in fh)
    return f"capture: {records} records in {len(names)} file(s), {size / 1e6:.1f} MB on disk"


def _uvloop():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
