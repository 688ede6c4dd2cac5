"""What DKIM verification costs, and what it does to the other sessions.

    python -m bench.dkim                 # all three parts, two to four minutes
    python -m bench.dkim --quick         # smaller and fewer: a smoke run
    python -m bench.dkim --parts sessions --sessions 20 --size-mb 5

Parts (`--parts verify,offload,sessions`):

* verify: the CPU time of verifying one RSA-2048 signature (`spamgate.checks.engines.dkimverify`,
  i.e. dkimpy) on messages of 10 KB, 1 MB and 10 MB, with relaxed and with simple
  canonicalisation, in this process; and the same through the worker process
  pool spamgate uses for large messages (the message passed as a spooled file).
* offload: how long this process's event loop stands still while one message of
  `--size-mb` is verified inline, in a thread, and in a worker process: a probe
  task sleeps 1 ms over and over and the longest oversleep is reported. This is
  why spamgate uses processes, not threads, for large messages.
* sessions: spamgate as a separate process (`bench.loopprobe`, which adds the same
  probe to spamgate's own loop), `--sessions` clients each sending one signed
  `--size-mb` message at the same time, with SPF, DKIM and DMARC on, and again
  with them off. Reported: spamgate's longest loop stall and 99th percentile
  (sampled every 2 ms), the wall time, per-message latency, spamgate's CPU time
  and peak RSS (the event loop's process), the largest peak RSS of its worker
  processes, and how many signatures passed (spamgate's own counter).

Everything runs on loopback: the tests' DNS responder (`python -m tests.kit.dnsserver`)
publishes the key and the policies, Postfix's smtp-sink (or the tests' sink) is the
upstream. Bounded: at most 50 sessions, 20 MB messages and 300 s per run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dns_checks import Procs, cpu_seconds, free_port, source, wait_port  # noqa: E402
from spamgate.checks.engines.dkimverify import key_name, verify, verify_message  # noqa: E402
from tests.kit.dkimkeys import Signer  # noqa: E402
from tests.kit.smtpclient import RawClient  # noqa: E402

MAX_SESSIONS = 50
MAX_SIZE_MB = 20
RUN_LIMIT = 300.0
SIGNER = Signer("bench.test", "sel")
ZONES = {
    "bench.test": {
        "records": {
            "@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
            SIGNER.name: {"TXT": SIGNER.record},
        }
    }
}
ANSWERS = {key_name(SIGNER.domain, SIGNER.selector): SIGNER.record.encode()}


def message(size: int) -> bytes:
    """A plain-text message of about `size` bytes, with the runs of spaces and
    trailing blanks that relaxed canonicalisation has to rewrite."""
    head = (
        b"From: Alice <alice@bench.test>\r\nTo: <u@example.test>\r\nSubject: bench\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    )
    line = b"Lorem ipsum dolor sit amet,  consectetur adipiscing elit, sed do eiusmod \r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def signed(size: int, canon: bytes = b"relaxed") -> bytes:
    return SIGNER.sign(message(size), canonicalize=(canon, canon))


def pool() -> concurrent.futures.ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["spamgate.checks.engines.dkimverify"])
    return concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=os.nice, initargs=(10,)
    )


def timed(fn, *args) -> float:
    started = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - started
    assert [r.result for r in result] == ["pass"], result
    return elapsed


# -- part 1: cost per message ------------------------------------------------------------


def part_verify(quick: bool, tmp: Path) -> None:
    sizes = [(10 * 1024, "10 KB", 30), (1024 * 1024, "1 MB", 5), (10 * 1024 * 1024, "10 MB", 3)]
    if quick:
        sizes = [(s, label, 1 if s > 2**20 else 3) for s, label, _ in sizes]
    print("verify: one RSA-2048 signature, median ms per message")
    print(f"{'size':>6} {'relaxed':>9} {'simple':>9} {'relaxed, worker process (file)':>31}")
    with pool() as workers:
        workers.submit(int).result()  # the worker is up
        for size, label, runs in sizes:
            row = []
            for canon in (b"relaxed", b"simple"):
                msg = signed(size, canon)
                row.append(
                    statistics.median(timed(verify, msg, ANSWERS, 5, 1024) for _ in range(runs))
                )
            path = tmp / "message.eml"
            path.write_bytes(signed(size))
            remote = []
            for _ in range(runs):
                started = time.perf_counter()
                found = workers.submit(verify_message, str(path), ANSWERS, 5, 1024).result()
                remote.append(time.perf_counter() - started)
                assert [r.result for r in found] == ["pass"]
            row.append(statistics.median(remote))
            print(f"{label:>6} {row[0] * 1000:>9.1f} {row[1] * 1000:>9.1f} {row[2] * 1000:>31.1f}")


# -- part 2: thread or process -----------------------------------------------------------


async def longest_stall(work) -> tuple[float, float]:
    """(longest oversleep of a 1 ms ticker in seconds, elapsed) while `work` runs."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - started - 0.001)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - started
    done.set()
    await task
    return worst, elapsed


async def part_offload(size_mb: float, tmp: Path) -> None:
    size = int(size_mb * 1024 * 1024)
    msg = signed(size)
    path = tmp / "offload.eml"
    path.write_bytes(msg)
    loop = asyncio.get_running_loop()
    threads = concurrent.futures.ThreadPoolExecutor(1)
    with pool() as workers:
        await loop.run_in_executor(workers, int)

        async def inline() -> None:
            verify(msg, ANSWERS, 5, 1024)

        async def thread() -> None:
            await loop.run_in_executor(threads, verify, msg, ANSWERS, 5, 1024)

        async def process() -> None:
            await loop.run_in_executor(workers, verify_message, str(path), ANSWERS, 5, 1024)

        print(f"offload: the event loop while one {size_mb:g} MB message is verified (relaxed)")
        print(f"{'where':<16} {'longest stall ms':>17} {'elapsed ms':>11}")
        for name, work in (("inline", inline), ("thread", thread), ("worker process", process)):
            stall, elapsed = await longest_stall(work)
            print(f"{name:<16} {stall * 1000:>17.1f} {elapsed * 1000:>11.1f}")
    threads.shutdown()


# -- part 3: many sessions through spamgate ------------------------------------------------


async def send(port: int, n: int, wire: bytes) -> float:
    started = time.perf_counter()
    c, banner = await RawClient.connect(port, source=source(n))
    assert banner is not None and banner.code == 220, banner
    for line in ("EHLO mx.bench.test", "MAIL FROM:<alice@bench.test>", "RCPT TO:<u@example.test>"):
        reply = await c.cmd(line)
        assert reply.code == 250, reply
    assert (await c.cmd("DATA")).code == 354
    view = memoryview(wire)
    for i in range(0, len(view), 65536):
        c.writer.write(view[i : i + 65536])
        await c.writer.drain()
    reply = await c.reply(timeout=RUN_LIMIT)
    assert reply.code == 250, reply
    await c.cmd("QUIT")
    await c.close()
    return time.perf_counter() - started


async def report(proc: asyncio.subprocess.Process, prefix: str) -> str:
    async with asyncio.timeout(10):
        while True:
            line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("spamgate exited")
            if line.startswith(prefix):
                return line.strip()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (spamgate's forkserver and its DKIM workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def run_sessions(checks: bool, sessions: int, wire: bytes, tmp: Path) -> dict:
    procs = Procs()
    try:
        dns_port, sink_port, gate_port = (free_port() for _ in range(3))
        zones = tmp / "zones.json"
        zones.write_text(json.dumps(ZONES))
        await procs.start(
            sys.executable,
            "-m",
            "tests.kit.dnsserver",
            "--port",
            str(dns_port),
            str(zones),
            ready="serving",
        )
        smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if os.path.exists(smtp_sink):
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            await procs.start(smtp_sink, *user, f"127.0.0.1:{sink_port}", "256")
        else:
            code = (
                "import asyncio\nfrom tests.kit.sink import Sink\n"
                "async def main():\n"
                "    s = Sink(); s.behaviour.keep_content = False\n"
                "    loop = asyncio.get_running_loop()\n"
                f"    await loop.create_server(s._factory, '127.0.0.1', {sink_port})\n"
                "    await asyncio.Event().wait()\n"
                "asyncio.run(main())\n"
            )
            await procs.start(sys.executable, "-c", code)
        await wait_port(sink_port)
        spool = tmp / "spool"
        spool.mkdir(exist_ok=True)
        config = tmp / "gate.toml"
        config.write_text(
            f"""
[server]
listen = ["127.0.0.1:{gate_port}"]
hostname = "gate.test"
relay_domains = ["example.test"]
mynetworks = ["127.0.0.1/32"]
spool_dir = "{spool}"

[upstream]
address = "127.0.0.1:{sink_port}"
xclient = false

[limits]
message_size = {len(wire) * 2}

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
reverse_lookup = false
"""
            + (
                "\n[spf]\nenabled = true\n\n[dkim]\nenabled = true\n\n[dmarc]\nenabled = true\n"
                if checks
                else ""
            )
        )
        gate = await procs.start(
            sys.executable,
            "-m",
            "bench.loopprobe",
            "run",
            "-c",
            str(config),
            "--log-level",
            "warning",
            ready="probe started",
        )
        await wait_port(gate_port)
        await send(gate_port, 0, wire)  # warm-up: worker process started, key cached
        gate.send_signal(signal.SIGUSR1)
        await report(gate, "lag ")
        cpu_before = cpu_seconds(gate.pid)
        started = time.perf_counter()
        async with asyncio.timeout(RUN_LIMIT):
            latencies = await asyncio.gather(
                *(send(gate_port, n + 1, wire) for n in range(sessions))
            )
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(gate.pid) or 0) - (cpu_before or 0)
        gate.send_signal(signal.SIGUSR1)
        lag = dict(kv.split("=") for kv in (await report(gate, "lag ")).split()[1:])
        workers = [peak_rss_mb(p) for p in descendants(gate.pid)]
        return {
            "elapsed": elapsed,
            "p50": statistics.median(latencies),
            "max": max(latencies),
            "stall": float(lag["max_ms"]),
            "p99": float(lag["p99_ms"]),
            "cpu": cpu,
            "rss": peak_rss_mb(gate.pid),
            "workers": max(workers, default=0.0),
            "passed": int(lag["dkim_pass"]) - (1 if checks else 0),  # less the warm-up
        }
    finally:
        await procs.stop()


async def part_sessions(sessions: int, size_mb: float, tmp: Path) -> None:
    wire = re.sub(rb"(?m)^\.", b"..", signed(int(size_mb * 1024 * 1024))) + b".\r\n"
    print(
        f"sessions: {sessions} clients at once, each one {size_mb:g} MB signed message "
        "(spamgate in its own process)"
    )
    print(
        f"{'checks':<22} {'stall max ms':>12} {'p99 ms':>7} {'wall s':>7} {'msg p50 s':>9} "
        f"{'msg max s':>9} {'CPU s':>6} {'RSS MB':>7} {'worker MB':>9} {'dkim pass':>9}"
    )
    for checks in (False, True):
        r = await run_sessions(checks, sessions, wire, tmp)
        name = "SPF, DKIM, DMARC" if checks else "none"
        worker = f"{r['workers']:.1f}" if checks else "-"
        print(
            f"{name:<22} {r['stall']:>12.1f} {r['p99']:>7.1f} {r['elapsed']:>7.2f} "
            f"{r['p50']:>9.2f} {r['max']:>9.2f} {r['cpu']:>6.2f} {r['rss']:>7.1f} "
            f"{worker:>9} {r['passed'] if checks else '-':>9}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="verify,offload,sessions")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller runs")
    args = parser.parse_args()
    sessions = max(1, min(args.sessions, MAX_SESSIONS))
    size_mb = max(0.01, min(args.size_mb, MAX_SIZE_MB))
    if args.quick:
        sessions, size_mb = min(sessions, 5), min(size_mb, 1.0)
    parts = set(args.parts.split(","))
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-dkim-") as name:
        tmp = Path(name)
        if "verify" in parts:
            part_verify(args.quick, tmp)
        if "offload" in parts:
            await part_offload(size_mb, tmp)
        if "sessions" in parts:
            await part_sessions(sessions, size_mb, tmp)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
