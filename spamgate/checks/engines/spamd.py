"""A small spamd client: SYMBOLS over SPAMC/1.5, TCP or a Unix socket, bounded.

The protocol (SpamAssassin's spamd/PROTOCOL): a request line, `Content-length`,
an empty line and the message; spamd answers `SPAMD/1.1 0 EX_OK`, a
`Spam: True ; 1000.0 / 5.0` header (verdict, score, required score) and, for
SYMBOLS, the names of the rules that hit, comma-separated. As spamc does, a
message larger than `max_size` is not sent at all (spamc -s, 500 KB by default:
SpamAssassin's rules are written for mail, and scanning a large attachment
costs seconds and finds nothing).

Why not `aiospamc` (evaluated, 1.2.0, maintained): it pulls in a CLI framework
(typer) and a second logging system (loguru) for what is a hundred lines of
protocol, wants the message as one `bytes` (a spooled message would be loaded
whole), and reads spamd's answer without a bound. This client streams the
message block by block and reads at most 64 KB back.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from ...message import Message
from .backend import Address, connect, message_blocks

_ANSWER_MAX = 65536
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+ (\d+) (\S+)")
_SPAM = re.compile(rb"^Spam: *(True|False|Yes|No) *; *(-?[\d.]+) */ *(-?[\d.]+)", re.I | re.M)


class SpamdError(Exception):
    """spamd could not be reached or answered with an error."""


@dataclass(frozen=True)
class SpamdAnswer:
    spam: bool
    score: float
    required: float
    rules: tuple[str, ...] = ()


async def symbols(address: Address, message: Message, user: str = "spamgate") -> SpamdAnswer:
    """Ask spamd for the verdict and the rules that hit. The caller bounds the time."""
    try:
        reader, writer = await connect(address)
    except OSError as exc:
        raise SpamdError(f"cannot connect: {exc.strerror or exc}") from None
    try:
        try:
            writer.write(
                b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: %s\r\n\r\n"
                % (message.size, user.encode("ascii", "replace"))
            )
            async for block in message_blocks(message, message.size):
                writer.write(block)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            answer = await reader.read(_ANSWER_MAX)
            while len(answer) < _ANSWER_MAX:
                more = await reader.read(_ANSWER_MAX - len(answer))
                if not more:
                    break
                answer += more
        except (ConnectionError, OSError) as exc:
            raise SpamdError(f"connection lost: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return read_answer(answer)


def read_answer(answer: bytes) -> SpamdAnswer:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = _STATUS.match(head)
    if status is None:
        raise SpamdError(f"not a spamd answer: {head[:80]!r}")
    if status.group(1) != b"0":
        raise SpamdError(f"answered {head.splitlines()[0][:120].decode('ascii', 'replace')}")
    spam = _SPAM.search(head)
    if spam is None:
        raise SpamdError("no Spam: header in the answer")
    rules = tuple(r for r in (x.strip() for x in body.decode("ascii", "replace").split(",")) if r)
    return SpamdAnswer(
        spam.group(1).lower() in (b"true", b"yes"),
        float(spam.group(2)),
        float(spam.group(3)),
        rules[:200],
    )
