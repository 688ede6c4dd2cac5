"""Reading DATA: find the one true end of data, measure it, and refuse what is unsafe.

The end of data is CRLF "." CRLF and nothing else (RFC 5321 §4.1.1.4). A bare LF or
bare CR anywhere in the content is how SMTP smuggling works (CVE-2023-51764,
CVE-2024-27305): an upstream that reads line ends more loosely than we do could see
a second message. By default such content is refused with 550 5.5.2; with
`bare_newline = "normalize"` a bare LF becomes a line end and a bare CR a space, as
Postfix does, and the upstream re-stuffs the result so "." lines stay content.

The reader scans with `StreamReader.readuntil(b".\\r\\n")`, so the search runs in C and
the Python loop turns once per line that ends in a dot (or once per buffer-full),
not once per line. Content is unstuffed as it comes, in runs of whole lines, and
handed to a `Spool`, which keeps a large message on disk rather than in memory.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum

from ..message import Message
from ..spool import Spool

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_TERMINATOR = b"\r\n.\r\n"


class DataProblem(Enum):
    TOO_BIG = "message_too_big"
    LINE_TOO_LONG = "line_too_long"
    BARE_LF = "bare_newline"
    BARE_CR = "bare_cr"
    HEADER_TOO_BIG = "header_too_big"


@dataclass
class DataResult:
    message: Message | None  # canonical CRLF, dot-unstuffed; None when a problem was found
    size: int  # bytes received, as on the wire (before unstuffing)
    problem: DataProblem | None = None

    @property
    def content(self) -> bytes:
        """The whole content in memory (tests); b"" when a problem was found."""
        return self.message.content if self.message is not None else b""


class DataTimeout(Exception):
    """No data arrived within the timeout, or the client fell below the minimum rate."""

    def __init__(self, reason: str = "data timeout") -> None:
        super().__init__(reason)
        self.reason = reason


Seconds = float | Callable[[], float]
Timer = Callable[[float], AbstractAsyncContextManager[object]]


class _Pace:
    """How long DATA may take, and how long it may go quiet.

    Two bounds, as in Postfix: no more than `timeout` seconds without data
    (RFC 5321 §4.5.3.2.5 times each data block), and with `min_rate` the whole
    message within `timeout` plus one second per `min_rate` bytes received
    (smtpd_min_data_rate), so that a byte every few seconds cannot hold a session
    for ever. `timeout` may be a callable: it shrinks when the server comes under
    stress, and `timer` lets the session cut a wait short when it does.
    """

    def __init__(self, timeout: Seconds, min_rate: float, timer: Timer) -> None:
        self._timeout = timeout
        self.min_rate = min_rate
        self.timer = timer
        self.started = time.monotonic()

    @property
    def timeout(self) -> float:
        return self._timeout() if callable(self._timeout) else self._timeout

    def too_slow(self, now: float, received: int) -> bool:
        if self.min_rate <= 0:
            return False
        return now - self.started > self.timeout + received / self.min_rate


async def _read_piece(reader: asyncio.StreamReader, pace: _Pace, received: int) -> bytes:
    """`readuntil(b".\\r\\n")`, giving up only after `timeout` seconds without data.

    A piece ends at a line ending in a dot or at a full buffer (64 KiB), which a slow
    but steady sender may take longer than `timeout` to fill. So wait in slices and
    keep waiting as long as the buffer grew (it only grows while we wait): the
    timeout fires between `timeout` and 1.25 times `timeout` after the last byte
    arrived. `received` (bytes of this message before this piece) feeds the rate.
    """
    if reader._buffer.find(b".\r\n") >= 0:  # type: ignore[attr-defined]
        # Already here: no wait, so no timer (a message of lines ending in "." would
        # otherwise leave one cancelled timer per line in the loop's heap).
        return await reader.readuntil(b".\r\n")
    buffered = len(reader._buffer)  # type: ignore[attr-defined]
    quiet_since = time.monotonic()
    while True:
        try:
            async with pace.timer(pace.timeout / 4):
                return await reader.readuntil(b".\r\n")
        except TimeoutError:
            now = time.monotonic()
            if len(reader._buffer) != buffered:  # type: ignore[attr-defined]
                buffered, quiet_since = len(reader._buffer), now  # type: ignore[attr-defined]
            elif now - quiet_since >= pace.timeout:
                raise DataTimeout() from None
            if pace.too_slow(now, received + buffered):
                raise DataTimeout("data too slow") from None


class _Scanner:
    """Tracks line lengths and bare CR/LF across the pieces of one message."""

    def __init__(self, max_line: int, reject_bare: bool) -> None:
        # `max_line` counts the CRLF; the scanner counts the bytes before the LF.
        self.max_line = max_line - 1
        self.reject_bare = reject_bare
        self.line_len = 0  # length of the unfinished line so far
        self.last = b"\n"  # previous byte
        self.problem: DataProblem | None = None

    def feed(self, piece: bytes) -> None:
        if not piece or self.problem is not None:
            return
        first_lf = piece.find(b"\n")
        if first_lf < 0:
            self.line_len += len(piece)
        else:
            if self.line_len + first_lf > self.max_line:
                self.problem = DataProblem.LINE_TOO_LONG
                return
            self.line_len = len(piece) - piece.rfind(b"\n") - 1
        # The longest line within the piece. (A regular expression for a run of
        # max_line bytes without LF starts over at every byte: ~75 ms per MB.)
        if self.line_len > self.max_line or max(map(len, piece.split(b"\n"))) > self.max_line:
            self.problem = DataProblem.LINE_TOO_LONG
            return
        if not self.reject_bare:
            self.last = piece[-1:]
            return
        # Counted rather than searched for (bytes.count runs at memory speed; a
        # look-behind pattern tries every byte): a line end split between pieces
        # (CR here, LF first in the next) is neither bare LF nor bare CR.
        joined = 1 if piece[:1] == b"\n" and self.last == b"\r" else 0
        if self.last == b"\r" and piece[:1] != b"\n":
            self.problem = DataProblem.BARE_CR
            return
        crlf = piece.count(b"\r\n")
        if piece.count(b"\n") - crlf - joined > 0:
            self.problem = DataProblem.BARE_LF
            return
        if piece.count(b"\r") - crlf - (piece[-1:] == b"\r") > 0:
            self.problem = DataProblem.BARE_CR
            return
        self.last = piece[-1:]


async def read_data(
    reader: asyncio.StreamReader,
    *,
    max_size: int,
    max_line: int,
    bare_newline: str,
    timeout: Seconds,
    min_rate: float = 0.0,
    timer: Timer = asyncio.timeout,
    spool: Spool | None = None,
) -> DataResult:
    """Read up to and including the end-of-data line; never stop early.

    Even when the message is refused (too big, bad line ends) the rest is read and
    thrown away, so the next command is read from the right place (RFC 5321
    §4.2.5: the reply to DATA content comes after the final dot). The content goes
    to `spool` (in memory when none is given), which the caller owns once the
    message is returned: `Message.close()` removes its file.
    Raises `asyncio.IncompleteReadError` if the client goes away, `DataTimeout` if
    it stalls or stays below `min_rate` bytes/s (see `_Pace`).
    """
    pace = _Pace(timeout, min_rate, timer)
    spool = spool if spool is not None else Spool()
    normalize = bare_newline == "normalize"
    scanner = _Scanner(max_line, reject_bare=not normalize)
    size = 0
    tail = b"\r\n"  # the CRLF that ended the DATA command line
    problem: DataProblem | None = None
    # Content is unstuffed in runs of whole lines: `carry` is the unfinished last
    # line (bounded by max_line, or the scanner stops it), `line_start` says
    # whether the run before ended with CRLF, so a dot at its start was stuffed.
    carry = b""
    line_start = True
    try:
        while True:
            try:
                chunk = await _read_piece(reader, pace, size)
                ended = (tail + chunk[-5:]).endswith(_TERMINATOR)
            except asyncio.LimitOverrunError as exc:
                # the buffer is full (exc.consumed bytes), so this returns at once
                chunk = await reader.read(max(exc.consumed, 1))
                ended = False
            piece = chunk[:-3] if ended else chunk
            tail = (tail + chunk[-2:])[-2:]
            del chunk
            size += len(piece)
            if not ended and pace.too_slow(time.monotonic(), size):
                raise DataTimeout("data too slow")
            if problem is None:
                if size > max_size:
                    problem = DataProblem.TOO_BIG
                else:
                    scanner.feed(piece)
                    problem = scanner.problem
                if problem is None:
                    run = carry + piece
                    del piece
                    cut = len(run) if ended else run.rfind(b"\n") + 1
                    out = unstuff(run[:cut], line_start, normalize=normalize) if cut else b""
                    if cut:
                        line_start = run[cut - 2 : cut] == b"\r\n"
                    carry = run[cut:]
                    del run  # only `out` and `carry` stay while the spool writes
                    await spool.write(out)
                    del out
                    if spool.header_too_big:
                        problem = DataProblem.HEADER_TOO_BIG
                if problem is not None:
                    spool.discard()
                    carry = b""
            if ended:
                break
    except BaseException:
        spool.discard()
        raise
    if problem is not None:
        return DataResult(None, size, problem)
    return DataResult(await spool.finish(), size)


def unstuff(run: bytes, line_start: bool, *, normalize: bool) -> bytes:
    """Undo dot-stuffing in a run of whole lines; optionally fix bare line ends.

    `line_start` says the run starts a line (the previous one ended with CRLF).
    Applied to consecutive runs cut after an LF, this gives the same bytes as
    applying it once to the whole content.
    """
    if line_start and run.startswith(b"."):
        run = run[1:]
    run = run.replace(b"\r\n.", b"\r\n")
    if normalize:
        run = _BARE_LF.sub(b"\r\n", run)
        run = _BARE_CR.sub(b" ", run)
    return run
