"""How fast `spamgate replay` goes: recorded transactions replayed per second of CPU.

    python -m bench.replay                    # 2,000 sessions recorded, replayed x10
    python -m bench.replay --sessions 500 --copies 4 --rounds 1   # a smoke run
    python -m bench.replay --checks full      # + rule tables, DKIM and DMARC
    python -m bench.replay --profile /tmp/replay.prof

First it records a capture the real way: spamgate runs in this process with
[capture] on, the tests' DNS server and sink on loopback (tests/kit), and
`--sessions` SMTP sessions go through it over real sockets, one message of 2 KB
each, from 200 client addresses (one in ten listed by the DNS list: refused at
RCPT) and 50 senders of 10 domains whose SPF records allow them. Messages are
recorded without their bodies ([capture] store_messages off, the default): the
header section, size and digest.

Then the capture (copied `--copies` times into one file) is replayed through the
same configuration, `--rounds` times, each in one process on one core: the
figure is records per second of the process's CPU time (user + system), the
best and the median of the rounds, and each round must change nothing (the
replay's exit status 0).

Checks (`--checks`): `compare` (bench.compare's: a DNS list, SPF for MAIL FROM and
HELO, relay control, the client's verified name) or `full` (those, plus client,
sender and header rule tables and DKIM and DMARC on messages the senders sign).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spamgate import app  # noqa: E402
from spamgate.ops.server import Server  # noqa: E402
from spamgate.replay.command import replay  # noqa: E402
from spamgate.replay.records import capture_files  # noqa: E402
from tests.kit.dkimkeys import Signer  # noqa: E402
from tests.kit.dnsserver import DnsServer  # noqa: E402
from tests.kit.sink import Sink  # noqa: E402
from tests.kit.smtpclient import RawClient  # noqa: E402

CLIENTS, SENDERS, DOMAINS = 200, 50, 10
BODY = b"Subject: bench\r\nTo: <u@example.test>\r\n\r\n" + b"Hello, world.\r\n" * 128

CONFIG = """\
[server]
listen = ["127.0.0.1:0"]
hostname = "gate.bench.test"
relay_domains = ["example.test"]
mynetworks = []
quarantine = "{work}/quarantine"

[upstream]
address = "{sink}"

[dns]
nameservers = ["{dns}"]
timeout = 0.5
lifetime = 1.0

[limits]
max_sessions = 1000
sessions_per_client = 1000

[dnsbl]
sites = ["bl.test"]

[spf]
enabled = true

[capture]
enabled = true
directory = "{work}/capture"
min_free = 0
"""

FULL = """
[rules]
client = ["cidr:{work}/client.cidr"]
sender = ["hash:{work}/sender"]
header = ["regexp:{work}/header.regexp"]

[dkim]
enabled = true

[dmarc]
enabled = true
"""


def domain(i: int) -> str:
    return f"d{i % DOMAINS}.bench.test"


def publish(dns: DnsServer, signers: list[Signer]) -> None:
    listed = {
        f"{i % 250 + 1}.0.1.127": {"A": "127.0.0.2", "TXT": "listed"} for i in range(0, CLIENTS, 10)
    }
    dns.zone("bl.test", listed, ttl=3600)
    for k in range(DOMAINS):
        records = {
            "@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
            "_dmarc": {"TXT": "v=DMARC1; p=none"},
        }
        records[signers[k].name] = {"TXT": signers[k].record}
        dns.zone(domain(k), records, ttl=3600)


async def record(args: argparse.Namespace, work: Path) -> Path:
    dns, sink = DnsServer(), Sink()
    await dns.start()
    await sink.start()
    signers = [Signer(domain(k), "sel") for k in range(DOMAINS)]
    publish(dns, signers)
    text = CONFIG.format(work=work, sink=sink.address, dns=dns.address)
    if args.checks == "full":
        (work / "client.cidr").write_text("192.0.2.0/24 REJECT\n")
        (work / "sender").write_text("spammer@d1.bench.test REJECT\n")
        (work / "header.regexp").write_text("/^Subject: buy now/ REJECT\n")
        text += FULL.format(work=work)
    (work / "spamgate.toml").write_text(text)
    server = Server(app.build(app.loads(text, str(work / "spamgate.toml"))))
    await server.start()
    port = server.addresses[0][1]
    sem = asyncio.Semaphore(20)

    async def session(i: int) -> None:
        async with sem:
            source = f"127.0.1.{i % CLIENTS % 250 + 1}"
            sender = f"s{i % SENDERS}@{domain(i % SENDERS)}"
            body = BODY.replace(b"Subject", f"From: <{sender}>\r\nSubject".encode(), 1)
            if args.checks == "full":
                body = signers[(i % SENDERS) % DOMAINS].sign(body)
            c, _ = await RawClient.connect(port, source=source)
            await c.mail(sender, ["u@example.test"], body, helo=f"mx{i % CLIENTS}.bench.test")
            await c.cmd("QUIT")
            await c.close()

    await asyncio.gather(*(session(i) for i in range(args.sessions)))
    await server.stop(grace=1)
    await sink.stop()
    await dns.stop()
    (capture,) = capture_files([str(work / "capture")])
    return Path(capture)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--copies", type=int, default=10, help="replay the capture this many times")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checks", choices=("compare", "full"), default="compare")
    p.add_argument("--profile", help="write a cProfile of the first round here")
    p.add_argument("--gc", choices=("on", "off", "freeze", "high"), default="on")
    a = p.parse_args()
    if not 1 <= a.sessions <= 20000 or not 1 <= a.copies <= 50:
        p.error("at most 20,000 sessions and 50 copies")
    with tempfile.TemporaryDirectory(prefix="sg-replay-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        capture = asyncio.run(record(a, work))
        records = capture.read_bytes()
        count = records.count(b"\n")
        big = work / "replayed.jsonl"
        with open(big, "wb") as out:
            for _ in range(a.copies):
                out.write(records)
        print(
            f"recorded {count} transactions in {time.monotonic() - started:.1f} s "
            f"({len(records) / count:.0f} bytes each, checks: {a.checks}); "
            f"replaying {count * a.copies} per round",
            file=sys.stderr,
        )
        config = app.loads((work / "spamgate.toml").read_text(), str(work / "spamgate.toml"))
        rates, loads = [], [os.getloadavg()[0]]
        for n in range(a.rounds):
            profile = cProfile.Profile() if a.profile and n == 0 else None
            cpu = time.process_time()
            wall = time.monotonic()
            if profile is not None:
                profile.enable()
            import gc

            if a.gc == "off":
                gc.disable()
            elif a.gc == "freeze":
                gc.freeze()
            elif a.gc == "high":
                gc.freeze()
                gc.set_threshold(20000, 50, 50)
            diff, error = run(config, big)
            gc.enable()
            if profile is not None:
                profile.disable()
                profile.dump_stats(a.profile)
            cpu = time.process_time() - cpu
            wall = time.monotonic() - wall
            if error is not None or diff.status != 0:
                raise SystemExit(f"bench: the replay changed something: {error or diff.as_dict()}")
            rates.append(diff.total / cpu)
            print(
                f"  round {n + 1}: {diff.total} records in {cpu:.2f} s CPU ({wall:.2f} s wall): "
                f"{diff.total / cpu:,.0f} records/s per core{' (profiled)' if profile else ''}",
                file=sys.stderr,
            )
        loads.append(os.getloadavg()[0])
        shutil.rmtree(work / "capture", ignore_errors=True)
    measured = rates[1:] if a.profile and len(rates) > 1 else rates
    print(
        f"replay, checks {a.checks}: {count * a.copies} records per round, without bodies; "
        f"best {max(measured):,.0f}, median {statistics.median(measured):,.0f} records/s per "
        f"core (target >= 5,000); load average {loads[0]:.2f} at start, {loads[1]:.2f} at end"
    )


def run(config, path: Path):
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(replay(config, [str(path)]))


if __name__ == "__main__":
    main()
