"""A durable, misbehaving upstream MTA for the chaos run (bench/chaos.py).

An aiosmtpd server in its own process, so that the chaos run can SIGKILL it,
restart it, or SIGSTOP it past spamgate's upstream timeouts. It offers XCLIENT
like Postfix, and it is durable like Postfix: a message is accepted only once
its id (the `X-Chaos-Id` header) is appended to the journal and fsync'd, and
only then is 250 sent, so the journal after a SIGKILL holds exactly what it
took. With `--faults`, it also misbehaves at random (seeded): 4xx/5xx at MAIL,
RCPT, DATA and the final dot, a reset in the middle of DATA, a slow reply to
the dot. Each fault it injects is appended to `JOURNAL.faults`.

    python -m bench.chaos_sink --port 2526 --journal /tmp/j --faults --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session

ID = re.compile(rb"^X-Chaos-Id: (\d+)\r?$", re.MULTILINE)
POLICY = re.compile(rb"^X-Policy: (\w+)\r?$", re.MULTILINE)

# Fault probabilities per command, when --faults is on.
FAULTS = {
    "MAIL": (0.02, ["451 4.3.0 chaos: try later", "550 5.7.1 chaos: no"]),
    "RCPT": (0.02, ["450 4.2.0 chaos: busy", "550 5.1.1 chaos: unknown"]),
    "DATA": (0.01, ["451 4.3.0 chaos: not now"]),
    "DOT": (0.03, ["451 4.3.0 chaos: queue trouble", "554 5.6.0 chaos: refused"]),
}
RESET_IN_DATA = 0.02
SLOW_DOT = (0.02, 1.5)  # probability, seconds


class Journal:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.faults = os.open(path + ".faults", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def accepted(self, ident: bytes, policies: list[bytes]) -> None:
        """One line, "ID POLICY,POLICY", on disk before the 250 goes out."""
        os.write(self.fd, ident + b" " + b",".join(policies) + b"\n")
        os.fsync(self.fd)

    def fault(self, text: str) -> None:
        os.write(self.faults, text.encode() + b"\n")


class ChaosSMTP(SMTP):
    def __init__(self, journal: Journal, rng: random.Random | None) -> None:
        super().__init__(
            _Handler(), hostname="chaos-sink.test", data_size_limit=None, enable_SMTPUTF8=True
        )
        self.journal = journal
        self.rng = rng

    def _fault(self, name: str) -> str | None:
        if self.rng is None:
            return None
        probability, replies = FAULTS[name]
        if self.rng.random() >= probability:
            return None
        reply = self.rng.choice(replies)
        self.journal.fault(f"{name} {reply[:3]}")
        return reply

    async def smtp_EHLO(self, hostname: str) -> None:
        self.session.host_name = hostname
        self.session.extended_smtp = True
        for line in (
            "250-chaos-sink.test",
            "250-PIPELINING",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-ENHANCEDSTATUSCODES",
            "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN",
            "250 DSN",
        ):
            await self.push(line)

    async def smtp_XCLIENT(self, arg: str) -> None:
        self.session.host_name = None
        self._set_rset_state()
        await self.push("220 chaos-sink.test ESMTP")

    async def smtp_MAIL(self, arg: str) -> None:
        reply = self._fault("MAIL")
        if reply:
            await self.push(reply)
            return
        self.envelope.mail_from = arg
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 need MAIL")
            return
        reply = self._fault("RCPT")
        if reply:
            await self.push(reply)
            return
        self.envelope.rcpt_tos.append(arg)
        await self.push("250 2.1.5 Ok")

    async def smtp_DATA(self, arg: str) -> None:
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 no valid recipients")
            return
        reply = self._fault("DATA")
        if reply:
            await self.push(reply)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reset_at = None
        if self.rng is not None and self.rng.random() < RESET_IN_DATA:
            reset_at = self.rng.randint(0, 1500)
        data = bytearray()
        while True:
            line = await self._reader.readuntil(b"\r\n")
            if line == b".\r\n":
                break
            data += line[1:] if line.startswith(b".") else line
            if reset_at is not None and len(data) >= reset_at:
                self.journal.fault("RESET in data")
                self.transport.abort()
                # What is still buffered is message content, not commands.
                self._reader._buffer.clear()
                return
        m = ID.search(bytes(data))
        reply = self._fault("DOT")
        if reply is None and self.rng is not None and self.rng.random() < SLOW_DOT[0]:
            self.journal.fault("SLOW dot")
            await asyncio.sleep(SLOW_DOT[1])
        if reply is None:
            # Durable before it says so: the journal line is on disk before the 250.
            self.journal.accepted(m.group(1) if m else b"no-id", POLICY.findall(bytes(data)))
            reply = "250 2.0.0 Ok: queued"
        self._set_post_data_state()
        await self.push(reply)


class _Handler:
    """aiosmtpd wants a handler; every command is answered by ChaosSMTP itself."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 Ok"


async def serve(port: int, journal: Journal, rng: random.Random | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ChaosSMTP(journal, rng), "127.0.0.1", port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("chaos sink listening", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--faults", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)  # aiosmtpd's chatter on resets
    rng = random.Random(args.seed) if args.faults else None
    asyncio.run(serve(args.port, Journal(args.journal), rng))


if __name__ == "__main__":
    main()
