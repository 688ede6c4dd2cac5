"""Throughput with rate limits off, on the in-process store, and on Redis.

    python bench/state_throughput.py [--messages 3000] [--concurrency 20] [--runs 3]

Everything runs on loopback and is started and stopped here: Postfix's smtp-sink
as the upstream (with XCLIENT, as in front of Postfix), a private redis-server
(no persistence), one spamgate process per mode (`spamgate run`), and Postfix's
smtp-source as the load (one message per connection, HELO, tiny body, all from
127.0.0.1). With limits on, every one of the nine limits is set far above the
load, so each message makes three store operations (connect, RCPT, DATA) and
none is refused; all sessions share one client IP, the worst case for key
contention. The modes run in turns (off, memory, redis, off, ...) so that other
load on the machine falls on all alike. Bounded: at most 50k messages and 200
connections per run, 120 s per run. Prints the median msgs/s per mode.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
REDIS_SERVER = "/usr/bin/redis-server"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def config(listen: int, upstream: int, mode: str, redis_url: str, workdir: str) -> str:
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
    if mode == "redis":
        text += f'\n[state]\nredis = "{redis_url}"\n'
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="off,memory,redis")
    args = parser.parse_args()
    if not 1 <= args.messages <= 50000 or not 1 <= args.concurrency <= 200:
        parser.error("at most 50000 messages and 200 connections")
    for binary in (SMTP_SINK, SMTP_SOURCE, REDIS_SERVER):
        if not os.path.exists(binary):
            sys.exit(f"{binary} is missing (apt-get install postfix redis-server)")
    modes = args.modes.split(",")
    results: dict[str, list[float]] = {m: [] for m in modes}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as workdir:
        sink_port, redis_port = free_port(), free_port()
        sink = [SMTP_SINK, f"127.0.0.1:{sink_port}", "256"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root
            sink[1:1] = ["-u", "nobody"]
        start(stack, sink, sink_port, "smtp-sink")
        start(
            stack,
            [REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            redis_port,
            "redis-server",
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        ports: dict[str, int] = {}
        for mode in modes:
            ports[mode] = port = free_port()
            path = Path(workdir) / f"{mode}.toml"
            path.write_text(config(port, sink_port, mode, redis_url, workdir))
            argv = [sys.executable, "-m", "spamgate", "run", "-c", str(path)]
            start(stack, [*argv, "--log-level", "warning"], port, f"spamgate ({mode})")
            load(port, min(200, args.messages), args.concurrency)  # warm up
        # Modes take turns, run by run, so that load from elsewhere on the machine
        # falls on all of them alike; the idle instances cost nothing meanwhile.
        for _ in range(args.runs):
            for mode in modes:
                results[mode].append(load(ports[mode], args.messages, args.concurrency))
    base = statistics.median(results[modes[0]])
    print(
        f"messages={args.messages} concurrency={args.concurrency} runs={args.runs} "
        f"(median msgs/s; one message per connection)"
    )
    for mode in modes:
        runs = results[mode]
        median = statistics.median(runs)
        each = " ".join(f"{r:.0f}" for r in runs)
        share = f"{median / base:6.1%} of {modes[0]}"
        print(f"{mode:>7}: {median:8.1f} msgs/s  ({share})  runs: {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
