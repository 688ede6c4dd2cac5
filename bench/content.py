"""What the content checks cost: CPU per message and added latency, each on its own.

    python -m bench.content                # about a minute
    python -m bench.content --messages 50  # fewer messages per case

Run it from the repository root, as root or not, with clamav-daemon, spamd and
rspamd installed (Debian's packages); each daemon is started privately on
loopback (`tests.kit.daemons`, the same fixtures the tests use) and stopped at the
end. DNS is the tests' responder, in this process, publishing one listed domain.

For each check ([uribl], [attachments], [clamav], [spamassassin], [rspamd]) the
check's own `check()` runs on the same messages as the proxy would run it at end
of data: a typical 50 KB HTML newsletter with 100 links (40 distinct domains),
and the same with a 200 KB zip attachment. Reported per message: spamgate's CPU
time (this process: parsing, the client side of the protocol, counting) and the
wall time the check adds to the end of data (what the client waits), medians
and 95th percentiles. The daemons' own CPU is theirs and not counted here.

Also: link extraction alone on the 50 KB message, and extraction plus lookup
with the answers in the resolver's cache (the steady state of a busy MX: the
target is under 5 ms of CPU), and with 0, 10 and 100 links.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from spamgate.checks.attachments import AttachmentCheck, AttachmentSettings
from spamgate.checks.clamav import ClamavCheck, ClamavSettings
from spamgate.checks.engines.dnslist import ListPolicy
from spamgate.checks.rspamd import RspamdCheck, RspamdSettings
from spamgate.checks.spamassassin import SpamassassinCheck, SpamassassinSettings
from spamgate.checks.uribl import UriblCheck, UriblSettings
from spamgate.config import DnsSettings
from spamgate.message import Message
from spamgate.model import Client, Recipient, Session, Stage, Transaction
from spamgate.pipeline.check import CheckContext
from spamgate.resolver import DnsResolver
from tests.kit.daemons import Clamd, Rspamd, Spamd
from tests.kit.dnsserver import DnsServer
from tests.kit.mimemaker import html_base64, newsletter, with_attachment, zip_of


def context(message: Message) -> CheckContext:
    import ipaddress

    session = Session("BENCH", Client(ipaddress.ip_address("192.0.2.10"), 40000, "c.example"))
    session.client.helo = "c.example"
    txn = Transaction("a@example.org", recipients=[Recipient("u@example.test", accepted=True)])
    return CheckContext(Stage.EOD, session, txn, message=message)


def messages() -> dict[str, bytes]:
    html = newsletter(100, 50_000)
    plain = html_base64(html, "newsletter")
    archive = zip_of({f"report{n}.pdf": os.urandom(20_000) for n in range(10)})
    attached = with_attachment("reports.zip", archive, "application/zip", "zipped")
    return {"html50k": plain, "html50k+zip": attached}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(check, body: bytes, n: int) -> tuple[float, float, float, float]:
    """(median CPU ms, p95 CPU ms, median wall ms, p95 wall ms) per message."""
    cpu, wall = [], []
    for _ in range(3):  # warm: caches, connections, rspamd's and spamd's first-message costs
        await check.check(context(Message(body)))
    for _ in range(n):
        msg = Message(body)
        c0, w0 = time.process_time(), time.perf_counter()
        await check.check(context(msg))
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    return statistics.median(cpu), pct(cpu, 0.95), statistics.median(wall), pct(wall, 0.95)


async def main(n: int) -> None:
    dns = DnsServer()
    await dns.start()
    dns.zone("dbl.test", {"listed.test": {"A": "127.0.1.2"}})
    resolver = DnsResolver(DnsSettings(nameservers=[dns.address], timeout=1.0, lifetime=2.0))
    uribl_settings = UriblSettings(sites=["dbl.test=127.0.1.[2..99]"])
    uribl = UriblCheck(
        uribl_settings,
        ListPolicy.build(uribl_settings.sites, 1.0, {}),
        ListPolicy.build([], 1.0, {}),
        frozenset(),
        resolver,
    )
    daemons = [Clamd().start(), Spamd().start(), Rspamd().start()]
    clamd, spamd, rspamd = daemons
    try:
        checks = {
            "uribl": uribl,
            "attachments": AttachmentCheck(AttachmentSettings(enabled=True)),
            "clamav": ClamavCheck(ClamavSettings(address=clamd.unix)),
            "spamassassin": SpamassassinCheck(
                SpamassassinSettings(address=spamd.address, timeout=60)
            ),
            "rspamd": RspamdCheck(RspamdSettings(url=f"http://{rspamd.address}")),
        }
        print(f"load average before: {os.getloadavg()}")
        cols = f"{'check':<14}{'message':<14}{'CPU ms p50':>11}{'p95':>8}"
        print(cols + f"{'added ms p50':>14}{'p95':>8}")
        for label, body in messages().items():
            for name, check in checks.items():
                c50, c95, w50, w95 = await measure(check, body, n)
                print(f"{name:<14}{label:<14}{c50:>11.2f}{c95:>8.2f}{w50:>14.2f}{w95:>8.2f}")

        print("\nlinks in a 50 KB HTML message, this process's CPU per message (ms):")
        for links in (0, 10, 100):
            body = html_base64(newsletter(links, 50_000), f"n{links}")
            msg = Message(body)
            ex = []
            for _ in range(n):
                c0 = time.process_time()
                found, _ = uribl.links(msg)
                ex.append((time.process_time() - c0) * 1000)
            await uribl.judge(found)  # warms the cache
            both = []
            for _ in range(n):
                c0 = time.process_time()
                found, _ = uribl.links(Message(body))
                await uribl.judge(found)
                both.append((time.process_time() - c0) * 1000)
            size = len(body) // 1024
            print(
                f"  {links:>3} links ({size} KB): extraction {statistics.median(ex):.2f}, "
                f"extraction + cached lookup {statistics.median(both):.2f} "
                f"(p95 {pct(both, 0.95):.2f})"
            )
        print(f"load average after: {os.getloadavg()}")
    finally:
        for d in daemons:
            d.cleanup()
        await dns.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100, help="messages per case")
    args = parser.parse_args()
    asyncio.run(main(max(5, min(args.messages, 1000))))
