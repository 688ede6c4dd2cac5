"""Throughput with rate limits off, on the in-process store, and on each Redis topology.

    python -m bench.state_throughput [--messages 3000] [--concurrency 20] [--runs 3]
        [--modes off,memory,redis,sentinel,cluster]
    python -m bench.state_throughput --failover 5 [--retry-interval 2]

Everything runs on loopback and is started and stopped here: Postfix's smtp-sink
as the upstream (with XCLIENT, as in front of Postfix), private Redis servers (no
persistence; tests/kit/redisserver.py), one spamgate process per mode (`spamgate run`),
and Postfix's smtp-source as the load (one message per connection, HELO, tiny
body, all from 127.0.0.1).

Modes: `off` (no limits), `memory` (the in-process store), `redis` (one server),
`sentinel` (the primary three Sentinels name; it has a replica, so it also feeds
the replication stream), `cluster` (three primaries, no replicas). With limits
on, every one of the nine limits is set far above the load, so each message makes
three store operations (connect, RCPT, DATA) and none is refused; all sessions
share one client IP, the worst case for key contention. The modes run in turns
(off, memory, redis, ..., off, ...) so that other load on the machine falls on all
alike. Bounded: at most 50k messages and 200 connections per run, 120 s per run.

Per mode: the median msg/s; spamgate's CPU per message (user + system, from
/proc); the Redis servers' CPU per message (INFO cpu, summed over the servers
that hold data); Redis round trips per message: the commands clients sent, from
INFO commandstats summed over those servers, without the commands the Lua
scripts run inside themselves and without this benchmark's own INFO.

`--failover N`: N times, a fresh primary, replica and three Sentinels
(down-after-milliseconds 1000), one spamgate (on_unavailable = "tempfail",
`--retry-interval`) under load from bench/smtpload.py (20 sessions); the primary
is killed (SIGKILL) two seconds in. Reported: when the Sentinels had promoted the
replica, when spamgate's first write reached it (its first EVALSHA), and the
writes lost: messages spamgate accepted (each counted first) minus the count the
new primary holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.smtpload import message_body, run_load  # noqa: E402
from tests.kit.ports import free_port  # noqa: E402
from tests.kit.redisserver import (  # noqa: E402
    REDIS_CLI,
    REDIS_SENTINEL,
    REDIS_SERVER,
    ClusterSet,
    RedisServer,
    SentinelSet,
)

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
LIMIT = "1000000000/1m"
LIMITS = [
    "connections_per_ip",
    "connections_per_net",
    "messages_per_ip",
    "messages_per_net",
    "messages_per_sender_domain",
    "recipients_per_ip",
    "recipients_per_net",
    "recipients_per_sender_domain",
    "messages_per_recipient",
]
MODES = ["off", "memory", "redis", "sentinel", "cluster"]
# What our Lua scripts call inside themselves: commandstats counts those too.
SCRIPT_INSIDE = {"time", "hgetall", "hdel", "hincrby", "pexpire", "hexists", "get", "set"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def start(stack: ExitStack, argv: list[str], port: int, what: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    wait_listening(port, proc, what)
    return proc


def start_sink(stack: ExitStack) -> int:
    port = free_port()
    sink = [SMTP_SINK, f"127.0.0.1:{port}", "256"]
    if os.geteuid() == 0:  # smtp-sink refuses to run as root
        sink[1:1] = ["-u", "nobody"]
    start(stack, sink, port, "smtp-sink")
    return port


def config(listen: int, upstream: int, mode: str, state: list[str], workdir: str) -> str:
    text = f"""
[server]
listen = ["127.0.0.1:{listen}"]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = []
quarantine = "{workdir}/quarantine"

[upstream]
address = "127.0.0.1:{upstream}"

[dns]
reverse_lookup = false
"""
    if mode != "off":
        text += "\n[ratelimit]\n" + "".join(f'{name} = "{LIMIT}"\n' for name in LIMITS)
    if state:
        text += "\n[state]\n" + "\n".join(state) + "\n"
    return text


def load(port: int, messages: int, concurrency: int) -> float:
    argv = [
        SMTP_SOURCE,
        "-s", str(concurrency),
        "-m", str(messages),
        "-f", "sender@example.org",
        "-t", "user@example.test",
        "-M", "client.example.org",
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(
            f"smtp-source failed ({result.returncode}): {(result.stdout + result.stderr)[-500:]}"
        )
    return messages / elapsed


def redis_counters(nodes: list[RedisServer]) -> tuple[int, float]:
    """(commands clients sent, CPU seconds) summed over `nodes`, from INFO."""
    calls, cpu = 0, 0.0
    for node in nodes:
        client = node.client()
        for name, stats in client.info("commandstats").items():
            command = name.removeprefix("cmdstat_").split("|")[0]
            if command not in SCRIPT_INSIDE and command != "info":
                calls += int(stats["calls"])
        info = client.info("cpu")
        cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        client.close()
    return calls, cpu


class Mode:
    """One spamgate process and, for the Redis modes, the servers that hold its data."""

    def __init__(self, name: str, pid: int, port: int, nodes: list[RedisServer]) -> None:
        self.name, self.pid, self.port, self.nodes = name, pid, port, nodes
        self.rates: list[float] = []
        self.cpu: list[float] = []  # spamgate ms per message
        self.redis_cpu: list[float] = []
        self.trips: list[float] = []

    def measure(self, messages: int, concurrency: int) -> None:
        cpu0 = cpu_seconds(self.pid)
        calls0, rcpu0 = redis_counters(self.nodes)
        self.rates.append(load(self.port, messages, concurrency))
        self.cpu.append((cpu_seconds(self.pid) - cpu0) * 1000 / messages)
        if self.nodes:
            calls1, rcpu1 = redis_counters(self.nodes)
            self.trips.append((calls1 - calls0) / messages)
            self.redis_cpu.append((rcpu1 - rcpu0) * 1000 / messages)


def topology(stack: ExitStack, mode: str) -> tuple[list[str], list[RedisServer]]:
    """The [state] lines for `mode` and the servers that hold its data."""
    if mode == "redis":
        server = RedisServer()
        server.start()
        stack.callback(server.stop)
        return server.state_lines(), [server]
    if mode == "sentinel":
        sentinels = SentinelSet().start()
        stack.callback(sentinels.stop)
        return sentinels.state_lines(), [sentinels.primary]
    if mode == "cluster":
        cluster = ClusterSet().start()
        stack.callback(cluster.stop)
        return cluster.state_lines(), cluster.nodes
    return [], []


def throughput(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    load_before = os.getloadavg()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as workdir:
        sink_port = start_sink(stack)
        running: list[Mode] = []
        for mode in modes:
            state, nodes = topology(stack, mode)
            port = free_port()
            path = Path(workdir) / f"{mode}.toml"
            path.write_text(config(port, sink_port, mode, state, workdir))
            argv = [sys.executable, "-m", "spamgate", "run", "-c", str(path)]
            proc = start(stack, [*argv, "--log-level", "warning"], port, f"spamgate ({mode})")
            load(port, min(200, args.messages), args.concurrency)  # warm up
            running.append(Mode(mode, proc.pid, port, nodes))
        # Modes take turns, run by run, so that load from elsewhere on the machine
        # falls on all of them alike; the idle instances cost nothing meanwhile.
        for _ in range(args.runs):
            for m in running:
                m.measure(args.messages, args.concurrency)
    load_after = os.getloadavg()
    base = statistics.median(running[0].rates)
    print(
        f"messages={args.messages} concurrency={args.concurrency} runs={args.runs} "
        f"(median; one message per connection, three store operations per message); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"{'mode':>8}  {'msg/s':>7}  {'share':>6}  {'CPU ms/msg':>10}  "
        f"{'Redis CPU ms/msg':>16}  {'round trips/msg':>15}  runs msg/s"
    )
    for m in running:
        median = statistics.median(m.rates)
        redis_cpu = f"{statistics.median(m.redis_cpu):.3f}" if m.redis_cpu else "-"
        trips = f"{statistics.median(m.trips):.2f}" if m.trips else "-"
        each = " ".join(f"{r:.0f}" for r in m.rates)
        print(
            f"{m.name:>8}  {median:7.1f}  {median / base:6.1%}  "
            f"{statistics.median(m.cpu):10.2f}  {redis_cpu:>16}  {trips:>15}  {each}"
        )


# -- failover ---------------------------------------------------------------------------


class Watch(threading.Thread):
    """Polls the replica every 5 ms: when it became primary, when it got its first EVALSHA."""

    def __init__(self, replica: RedisServer) -> None:
        super().__init__(daemon=True)
        self.replica = replica
        self.promoted: float | None = None
        self.first_write: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        client = self.replica.client()
        while not self.done.is_set() and self.first_write is None:
            with contextlib.suppress(Exception):
                if self.promoted is None and client.info("replication")["role"] == "master":
                    self.promoted = time.monotonic()
                if self.promoted is not None:
                    stats = client.info("commandstats").get("cmdstat_evalsha")
                    if stats and int(stats["calls"]) > 0:
                        self.first_write = time.monotonic()
            time.sleep(0.005)
        client.close()


def window_count(server: RedisServer) -> int:
    client = server.client()
    keys = client.keys("spamgate:rl:*messages_per_ip*")
    total = sum(int(v) for key in keys for v in client.hvals(key))
    client.close()
    return total


def one_failover(sink_port: int, retry_interval: float, workdir: str) -> dict[str, float]:
    with ExitStack() as stack:
        sentinels = SentinelSet().start()
        stack.callback(sentinels.stop)
        port = free_port()
        state = [
            *sentinels.state_lines(),
            'on_unavailable = "tempfail"',
            f"retry_interval = {retry_interval}",
        ]
        path = Path(workdir) / "failover.toml"
        text = config(port, sink_port, "off", state, workdir)
        path.write_text(text + '\n[ratelimit]\nmessages_per_ip = "1000000000/1h"\n')
        argv = [sys.executable, "-m", "spamgate", "run", "-c", str(path), "--log-level", "warning"]
        start(stack, argv, port, "spamgate (failover)")
        watch = Watch(sentinels.replica)
        killed: list[float] = []

        async def scenario():
            async def kill_later() -> None:
                await asyncio.sleep(2)
                sentinels.primary.kill()
                killed.append(time.monotonic())
                watch.start()

            killer = asyncio.create_task(kill_later())
            result = await run_load(
                "127.0.0.1", port, messages=200_000, clients=20, seconds=10, body=message_body(512)
            )
            await killer
            return result

        result = asyncio.run(scenario())
        watch.done.set()
        watch.join()
        counted = window_count(sentinels.replica)
        deferred = sum(n for e, n in result.errors.items() if "451" in e)
        return {
            "promoted": (watch.promoted or float("nan")) - killed[0],
            "first_write": (watch.first_write or float("nan")) - killed[0],
            "accepted": result.sent,
            "counted": counted,
            "lost": result.sent - counted,
            "deferred": deferred,
            "other_failures": result.failed - deferred,
        }


def failover(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    trials = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as workdir:
        sink_port = start_sink(stack)
        for _ in range(args.failover):
            trials.append(one_failover(sink_port, args.retry_interval, workdir))
    load_after = os.getloadavg()
    print(
        f"failover: {args.failover} trials, sentinel down-after-milliseconds 1000, "
        f"spamgate retry_interval {args.retry_interval:g}, timeout 0.5, 20 sessions; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"{'trial':>5}  {'promoted s':>10}  {'first write s':>13}  {'accepted':>8}  "
        f"{'counted':>7}  {'lost':>4}  {'deferred (451)':>14}  other failures"
    )
    for n, t in enumerate(trials, 1):
        print(
            f"{n:>5}  {t['promoted']:10.2f}  {t['first_write']:13.2f}  {t['accepted']:8.0f}  "
            f"{t['counted']:7.0f}  {t['lost']:4.0f}  {t['deferred']:14.0f}  "
            f"{t['other_failures']:.0f}"
        )
    if len(trials) > 1:
        med = {k: statistics.median(t[k] for t in trials) for k in ("promoted", "first_write")}
        print(
            f"median: promoted {med['promoted']:.2f} s, first write {med['first_write']:.2f} s "
            f"after the kill; lost writes {sorted(int(t['lost']) for t in trials)}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--failover", type=int, default=0, metavar="N", help="N failover trials")
    parser.add_argument("--retry-interval", type=float, default=2.0)
    args = parser.parse_args()
    if not 1 <= args.messages <= 50000 or not 1 <= args.concurrency <= 200:
        parser.error("at most 50000 messages and 200 connections")
    if not 0 <= args.failover <= 20:
        parser.error("at most 20 failover trials")
    for binary in (SMTP_SINK, SMTP_SOURCE, REDIS_SERVER, REDIS_SENTINEL, REDIS_CLI):
        if not os.path.exists(binary):
            sys.exit(f"{binary} is missing (apt-get install postfix redis-sentinel redis-tools)")
    if args.failover:
        failover(args)
    else:
        throughput(args)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
