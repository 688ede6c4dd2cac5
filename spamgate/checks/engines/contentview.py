"""What header and body rules read: header lines and decoded text, within set bounds.

Header lines are unfolded and given as `Name: value`: the message's own headers,
then the headers of each MIME part (so a rule can see an attachment's file name,
as Postfix's mime_header_checks do). Body lines come from the text parts only,
decoded from quoted-printable or base64 and from their charset, so a rule matches
the words a reader sees rather than their transfer encoding. Parsing uses the
standard `email` package.

The work is bounded, because the message is a stranger's: only the first
`scan_size` bytes are parsed, at most `parts` MIME parts are looked at, and at most
`part_size` decoded bytes of each text part are read.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass

from ...message import Message

_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class ContentView:
    headers: tuple[str, ...]
    body: tuple[str, ...]
    truncated: bool  # some of the message was not read (a bound was reached)


@dataclass(frozen=True)
class ContentLimits:
    scan_size: int = 1048576
    part_size: int = 51200
    parts: int = 100


def extract(message: Message, limits: ContentLimits) -> ContentView:
    headers: list[str] = []
    used = 0
    truncated = False
    for h in message.headers:
        used += len(h.name) + len(h.value) + 4
        if used > limits.scan_size:
            truncated = True
            break
        headers.append(f"{h.name}: {h.unfolded()}")
    # Only the part that is read is loaded: a spooled message stays on disk. The
    # `email` package is given the header fields as Postfix reads them (not its
    # own reading of the raw block), so the MIME structure is the delivered one.
    data = message.header_section + message.head(limits.scan_size)[message.body_offset :]
    if message.size > limits.scan_size:
        truncated = True
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    body: list[str] = []
    for index, part in enumerate(parsed.walk()):
        if index >= limits.parts:
            truncated = True
            break
        if index > 0:
            headers += [f"{name}: {_unfold(str(value))}" for name, value in part.items()]
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        if len(payload) > limits.part_size:
            payload = payload[: limits.part_size]
            truncated = True
        body += _decode(payload, part.get_content_charset()).splitlines()
    return ContentView(tuple(headers), tuple(body), truncated)


def _unfold(value: str) -> str:
    return _FOLD.sub("", value).strip()


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "utf-8", "replace")
    except LookupError:  # an unknown charset name
        return payload.decode("utf-8", "replace")
