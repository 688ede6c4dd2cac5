"""What the checks that ask a daemon share: addresses, outages, the message in blocks.

clamd, rspamd and spamd each run beside spamgate, and each can be down, slow or
restarting. The rules are the same for all three: every exchange has a deadline;
a failure is a `CheckError`, so the runner applies the check's `on_error`
("continue": the mail goes on unscanned; "tempfail": 451); and an outage is
logged and counted once, when it starts, and its end once, when the daemon
answers again, so a dead daemon at 100 messages a second is two log lines, not
a hundred a second (`Outage`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from ...config.settings import parse_hostport
from ...message import Message
from ...pipeline.verdict import CheckError, Symbol

log = logging.getLogger("spamgate.backend")

BLOCK = 65536  # bytes per write to a daemon


def parse_address(text: str) -> tuple[str, int] | str:
    """ "host:port" -> (host, port); "unix:/path" -> "/path"."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f'"{text}": a Unix socket needs an absolute path (unix:/run/...)')
        return path
    return parse_hostport(text)


def check_address(value: str) -> str | None:
    """Config validator: empty (off), "host:port" or "unix:/path"."""
    if not value:
        return None
    try:
        parse_address(value)
    except ValueError as exc:
        return str(exc)
    return None


Address = tuple[str, int] | str


async def connect(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address)
    return await asyncio.open_connection(*address)


class BackendTimeout(CheckError):
    """The daemon did not answer in time (counted as kind "timeout")."""

    kind = "timeout"


@dataclass(frozen=True)
class OutageStarted:
    """Counted once when a daemon stops answering."""

    check: str

    def counted(self):
        yield "spamgate_backend_outages_total", (self.check,)


class Outage:
    """Whether a check's daemon answers; logs and counts an outage once."""

    def __init__(self, check: str, what: str) -> None:
        self.check = check
        self.what = what  # "clamd at 127.0.0.1:3310"
        self.down = False
        self.failures = 0

    def failed(self, detail: str, *, timeout: bool = False) -> CheckError:
        """The error to raise for this failure: loud for the first of an outage."""
        kind = BackendTimeout if timeout else CheckError
        self.failures += 1
        if self.down:
            return kind(f"{self.what}: {detail}", quiet=True)
        self.down = True
        log.warning("%s: %s; outage starts (further failures logged at debug)", self.what, detail)
        return kind(f"{self.what}: {detail}", quiet=True, result=OutageStarted(self.check))

    def answered(self) -> None:
        if self.down:
            log.warning("%s answers again after %d failed message(s)", self.what, self.failures)
        self.down = False
        self.failures = 0


def _blocks(message: Message) -> Iterator[bytes]:
    # The header fields as Postfix delivers them (`Message.header_section`): a
    # scanner must not read a field below a line that ended the header section.
    yield message.header_section
    yield from message.body_blocks()


async def message_blocks(message: Message, limit: int) -> AsyncIterator[bytes]:
    """The message as received (its header section as Postfix delivers it), in
    blocks, up to `limit` bytes; a spooled message is read in a worker thread,
    block by block, never whole."""
    sent = 0
    it = _blocks(message)
    while sent < limit:
        if message.path is None:
            block = next(it, None)
        else:
            block = await asyncio.to_thread(next, it, None)
        if block is None:
            return
        for i in range(0, len(block), BLOCK):
            piece = block[i : i + BLOCK][: limit - sent]
            if not piece:
                return
            sent += len(piece)
            yield piece


def printable(text: str, limit: int = 120) -> str:
    """Text from a daemon put in a reply or a header: printable ASCII, short."""
    out = " ".join("".join(ch if " " <= ch <= "~" else " " for ch in text).split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


_NOT_SYMBOL = re.compile(r"[^A-Za-z0-9_]")
SCANNER_SYMBOLS_MAX = 30  # a scanner's own symbols shown per message


def scanner_symbols(prefix: str, names: list[str] | tuple[str, ...]) -> tuple[Symbol, ...]:
    """A scanner's own rule names as spamgate symbols of score 0 (`RSPAMD_GTUBE`):
    shown in X-Spam-Symbols and explain; the scanner's total is scored on its own."""
    out: dict[str, Symbol] = {}
    for name in names[:SCANNER_SYMBOLS_MAX]:
        symbol = f"{prefix}_{_NOT_SYMBOL.sub('_', name)[:60]}"
        out.setdefault(symbol, Symbol(symbol, 0.0))
    return tuple(out.values())
