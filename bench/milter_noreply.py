"""Reply at every milter step, or let Postfix skip the replies (SMFIP_NR_*)?

    python -m bench.milter_noreply                 # 200 messages each way, alternating
    python -m bench.milter_noreply --messages 500 --rounds 3

Starts a private Postfix (tests/kit/postfix.py; needs root) whose `smtpd_milters` points
at spamgate's milter server in this process, with a handler that answers "continue"
to everything. One SMTP client sends messages one after the other (each its own
session: connect, EHLO, MAIL, RCPT, DATA, 12 header fields, a 2 KB body, QUIT) over
loopback TCP, first with a reply to every event (spamgate's default), then with
no reply to CONNECT, HELO, MAIL, RCPT, DATA, headers, end of headers and body.
Reported: the median and 90th percentile time per session as the client sees it.
Bounded: at most 2,000 messages per run, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spamgate.milter.negotiate import Needs  # noqa: E402
from spamgate.milter.protocol import Command  # noqa: E402
from tests.kit.milterkit import Recorder, running_milter  # noqa: E402
from tests.kit.postfix import PostfixInstance, free_port  # noqa: E402
from tests.kit.smtpclient import RawClient  # noqa: E402

MAX_MESSAGES = 2000
NO_REPLY = frozenset(
    {
        Command.CONNECT,
        Command.HELO,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
        Command.HEADER,
        Command.END_OF_HEADERS,
        Command.BODY,
    }
)
HEADERS = "".join(f"X-Header-{n}: value {n}\r\n" for n in range(9))
BODY = (
    f"From: a@example.org\r\nTo: u@example.test\r\nSubject: bench\r\n{HEADERS}\r\n"
    + ("z" * 76 + "\r\n") * 26
).encode()


async def one_round(postfix: PostfixInstance, port: int, needs: Needs, count: int) -> list[float]:
    times = []
    async with running_milter(Recorder(), needs, port=port):
        for _ in range(count):
            start = time.perf_counter()
            c, _ = await RawClient.connect(postfix.port)
            replies = await c.mail("a@example.org", ["u@example.test"], BODY)
            assert replies[-1].code == 250, replies[-1]
            await c.cmd("QUIT")
            await c.close()
            times.append(time.perf_counter() - start)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    count = min(args.messages, MAX_MESSAGES)
    port = free_port()
    lines = [
        f"smtpd_milters = inet:127.0.0.1:{port}",
        "milter_default_action = tempfail",
        "default_transport = discard",
        "virtual_transport = discard",
    ]
    results: dict[str, list[float]] = {"reply to every step": [], "no replies (NR_*)": []}
    with PostfixInstance(main_extra=lines) as postfix:
        for _ in range(args.rounds):
            results["reply to every step"] += await one_round(postfix, port, Needs(), count)
            results["no replies (NR_*)"] += await one_round(
                postfix, port, Needs(no_reply=NO_REPLY), count
            )
    print(f"load average {os.getloadavg()[0]:.2f}; {count} sessions x {args.rounds} rounds")
    print(f"{'':>22} {'p50 ms':>8} {'p90 ms':>8}")
    for name, times in results.items():
        q = statistics.quantiles(times, n=10)
        print(f"{name:>22} {statistics.median(times) * 1e3:>8.1f} {q[8] * 1e3:>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
