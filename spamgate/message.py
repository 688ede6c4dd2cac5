"""A received message: canonical CRLF bytes, dot-unstuffed, with a parsed header view.

The header block is parsed once, lazily, into raw (name, value) pairs in order, so
header rules, DKIM and DMARC read the same view. Values keep their folding; callers
that want one logical line use `unfolded()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

_FOLD = re.compile(r"\r\n(?=[ \t])")


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str  # raw, may contain CRLF folding

    def unfolded(self) -> str:
        return _FOLD.sub("", self.value).strip()


class Message:
    """The message as received, plus headers that spamgate will prepend."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    @property
    def size(self) -> int:
        return len(self._content)

    @property
    def content(self) -> bytes:
        return self._content

    @cached_property
    def _split(self) -> int:
        """Offset of the body (just after the empty line), or len when none."""
        data = self._content
        if data.startswith(b"\r\n"):
            return 2
        idx = data.find(b"\r\n\r\n")
        return len(data) if idx < 0 else idx + 4

    @property
    def header_bytes(self) -> bytes:
        return self._content[: self._split]

    @property
    def body(self) -> bytes:
        return self._content[self._split :]

    @cached_property
    def headers(self) -> tuple[Header, ...]:
        block = self.header_bytes
        out: list[Header] = []
        for raw in _iter_fields(block):
            name, sep, value = raw.partition(b":")
            if not sep or not name or b" " in name.strip() or name != name.rstrip():
                continue
            out.append(
                Header(
                    name.decode("ascii", "replace"),
                    value.decode("utf-8", "surrogateescape").strip(" \t"),
                )
            )
        return tuple(out)

    def get_all(self, name: str) -> list[Header]:
        lname = name.lower()
        return [h for h in self.headers if h.name.lower() == lname]


def _iter_fields(block: bytes) -> list[bytes]:
    """Split a header block into fields, keeping continuation lines with their field."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def render_headers(headers: list[tuple[str, str]]) -> bytes:
    """Prepended header fields, CRLF-terminated; values must already be folded."""
    return b"".join(
        f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in headers
    )
