"""A received message: canonical CRLF bytes, dot-unstuffed, with a parsed header view.

The header block is parsed once, lazily, into raw (name, value) pairs in order, so
header rules, DKIM and DMARC read the same view. Values keep their folding; callers
that want one logical line use `unfolded()`.

The header section ends where Postfix ends it (cleanup's MIME state machine,
mime_state.c, with is_header.c deciding what a header line is): at the empty
line, or at the first line that is neither a header field nor the continuation
of one, which Postfix delivers as the first line of the body, after an empty
line it puts in. A `From:` below such a line is body to Postfix and so to every
reader here (`scan_header`). Consumers that parse header fields with another
parser (the `email` package, dkimpy, the content scanners) are given
`header_section`: the same fields, written as Postfix writes them out.

A large message is not held in memory: `spool.Spool` writes it to a file as it
arrives and keeps only its header block, so a `Message` is either the whole content
in memory or the header block plus a `SpoolFile`. Readers that need little take
`head(n)`; the relay streams `Outgoing.blocks()`; only `content` loads it whole.
docs/memory.md says what a message in flight costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

_FOLD = re.compile(r"\r\n(?=[ \t])")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HTAB
# A header line as Postfix's is_header() reads one: a name of printable ASCII but
# ":" (no space, control, NUL or 8-bit byte in it; not empty), then optional white
# space (RFC 5322 §4.5.3, obsolete syntax), then the colon.
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# The first byte of content that has no header section: a line that starts with
# white space continues a field, and there is none to continue (see `relayed`).
WHITE_SPACE = (b" ", b"\t")

# Reads of a spooled message, and the blocks the relay sends, are this large.
BLOCK_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str  # raw, may contain CRLF folding

    def unfolded(self) -> str:
        return _FOLD.sub("", self.value).strip()


def _remove(fd: int, path: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


class SpoolFile:
    """A message on disk while it is in flight: created empty, removed on `close()`.

    The file has a name (not an unlinked temporary) so that a DKIM worker process
    can open it; it is removed when the message is done, or when the object is
    collected, whichever comes first. Writes and reads block: call them from a
    worker thread (the `Spool` and `Message` methods below do).
    """

    def __init__(self, directory: str | None = None) -> None:
        self.fd, self.path = tempfile.mkstemp(prefix="spamgate-", suffix=".eml", dir=directory)
        self.size = 0
        self._finalizer = weakref.finalize(self, _remove, self.fd, self.path)

    def append(self, parts: list[bytes]) -> None:
        """Write `parts` at the end, in order, without joining them first."""
        for i in range(0, len(parts), 512):
            views = [memoryview(p) for p in parts[i : i + 512]]
            while views:
                written = os.pwritev(self.fd, views, self.size)
                self.size += written
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


class Message:
    """The message as received: all of it in memory, or its header block in memory
    and the whole of it in a `SpoolFile`."""

    def __init__(self, content: bytes) -> None:
        self._content: bytes | None = content
        self._file: SpoolFile | None = None
        self._size = len(content)

    @classmethod
    def spooled(cls, header: bytes, file: SpoolFile) -> Message:
        """A message whose content is in `file`; `header` is its header block as
        `header_bytes` gives it (ending with the empty line, if there is one)."""
        msg = cls.__new__(cls)
        msg._content = None
        msg._file = file
        msg._size = file.size
        msg.__dict__["_split"] = len(header)
        msg.__dict__["header_bytes"] = header
        return msg

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str | None:
        """The file holding the whole message, or None if it is in memory."""
        return self._file.path if self._file is not None else None

    @property
    def content(self) -> bytes:
        """The whole message. For a spooled message this reads the file into memory:
        prefer `head()` and `blocks()`."""
        if self._content is not None:
            return self._content
        assert self._file is not None
        return self._file.read(0, self._size)

    def head(self, length: int) -> bytes:
        """The first `length` bytes (fewer if the message is shorter)."""
        if self._content is not None:
            return self._content[:length]
        assert self._file is not None
        return self._file.read(0, min(length, self._size))

    @cached_property
    def _split(self) -> int:
        """Offset of the body (see `scan_header`), or len when the header never ends."""
        end, _ = scan_header(self.content)
        return self._size if end is None else end

    @property
    def body_offset(self) -> int:
        """Where the body starts: after the empty line that ends the header section,
        or at the line that ended it otherwise."""
        return self._split

    @cached_property
    def header_closed(self) -> bool:
        """The header section ends with an empty line, or nothing follows it. False
        when a line that is no header field ended it: Postfix puts an empty line
        before such a line, and so does `relayed`."""
        header = self.header_bytes
        return self._split >= self._size or header == b"\r\n" or header.endswith(b"\r\n\r\n")

    @cached_property
    def headerless(self) -> bool:
        """The first line starts with a space or a tab: no field for it to continue.

        Postfix's smtpd reads such content as body and starts it with an empty line
        (smtpd.c: "Force an empty record when the queue file content begins with
        whitespace, so that it won't be considered as being part of our own
        Received: header"). The checks here see it the same way: no header fields.
        """
        return self.head(1) in WHITE_SPACE

    @cached_property
    def header_bytes(self) -> bytes:
        """The header section as received, with the empty line that ends it, if any."""
        return self.head(self._split)

    @cached_property
    def header_section(self) -> bytes:
        """The header fields as Postfix writes them out, and the empty line after them.

        For parsers of our own choosing (the `email` package, dkimpy) and for the
        content scanners, so that they read the fields `headers` reads and no
        other: a name written with white space before its colon (`Subject :`)
        becomes `Subject:`, as Postfix normalises it, and the section always ends
        with an empty line, even where the client's ended at a line that is no
        header field. The body (`body_offset`) follows it.
        """
        return normal_header(self.header_bytes)

    @property
    def body(self) -> bytes:
        """The body, in memory (see `content`)."""
        return self.content[self._split :]

    @cached_property
    def headers(self) -> tuple[Header, ...]:
        out: list[Header] = []
        for raw in _iter_raw_fields(self.header_bytes):
            header = _field(raw)
            if header is not None:  # None: the empty line that ends the section
                out.append(header)
        return tuple(out)

    def get_all(self, name: str) -> list[Header]:
        lname = name.lower()
        return [h for h in self.headers if h.name.lower() == lname]

    def body_blocks(self) -> Iterator[bytes]:
        """The body in blocks of at most BLOCK_SIZE bytes; blocks on file reads."""
        start = self._split
        if self._content is not None:
            for offset in range(start, self._size, BLOCK_SIZE):
                yield self._content[offset : offset + BLOCK_SIZE]
            return
        assert self._file is not None
        for offset in range(start, self._size, BLOCK_SIZE):
            yield self._file.read(offset, min(BLOCK_SIZE, self._size - offset))

    def relayed(self, added: bytes, drop: Callable[[Header], bool] | None = None) -> Outgoing:
        """The message as it goes on: `added` header fields first, then the header
        block without the fields `drop` selects, then the body as received.

        Nothing the client sent may continue a field of `added`: content that starts
        with white space (`headerless`) is put after an empty line, as Postfix does,
        so that the reader downstream sees it as body, not as more of our field.
        So is content whose header section a line that is no header field ended
        (`header_closed`): every reader downstream, Postfix or not, then sees the
        header section end where the checks here saw it end.
        """
        if self.headerless:
            return Outgoing(added + b"\r\n", b"", self)
        header = self.header_bytes
        close = b"" if self.header_closed else b"\r\n"
        removed = 0
        if drop is not None and any(drop(h) for h in self.headers):
            kept: list[bytes] = []
            for raw in _iter_raw_fields(header):
                field = _field(raw)
                if field is not None and drop(field):
                    removed += 1
                else:
                    kept.append(raw)
            header = b"".join(kept)
        return Outgoing(added, header + close, self, removed)

    def close(self) -> None:
        """Remove the spool file, if any; the message may not be read afterwards."""
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class Outgoing:
    """What is relayed: header fields spamgate adds, the received header block less
    the fields it removed (`removed` of them), then the body, read block by block."""

    added: bytes
    header: bytes
    message: Message
    removed: int = 0

    @property
    def size(self) -> int:
        return len(self.added) + len(self.header) + self.message.size - self.message._split

    def blocks(self) -> Iterator[bytes]:
        """Every byte, in order; blocks on file reads (run it in a thread)."""
        if self.added:
            yield self.added
        if self.header:
            yield self.header
        yield from self.message.body_blocks()

    async def ablocks(self) -> AsyncIterator[bytes]:
        """As `blocks()`, reading a spooled body in a worker thread."""
        if self.message.path is None:
            for block in self.blocks():
                yield block
            return
        it = self.blocks()
        while True:
            block = await asyncio.to_thread(next, it, None)
            if block is None:
                return
            yield block

    def to_bytes(self) -> bytes:
        """The whole message in memory (explain, small tests)."""
        return b"".join(self.blocks())


def _iter_raw_fields(block: bytes) -> list[bytes]:
    """The header block's fields, each with its own CRLFs, so that joining them
    gives back the block (the empty line that ends it is its own item)."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n")[:-1]:
        line += b"\r\n"
        if line[:1] in (b" ", b"\t") and fields and fields[-1] != b"\r\n":
            fields[-1] += line
        else:
            fields.append(line)
    rest = block[sum(len(f) for f in fields) :]
    if rest:
        fields.append(rest)
    return fields


def _field(raw: bytes) -> Header | None:
    """One field, or None for a line that is not one.

    The name is what Postfix's is_header() accepts: printable ASCII up to the
    colon, and white space before the colon is allowed (RFC 5322 §4.5.3, obsolete
    syntax). Postfix keeps such a field and writes it out as "Name:", so it must
    count here too: a forged `Authentication-Results :` is one to remove.
    """
    m = _HEADER_LINE.match(raw)
    if m is None:
        return None
    value = raw[m.end() :].decode("utf-8", "surrogateescape").strip(" \t\r\n")
    return Header(m.group(1).decode("ascii"), value)


def is_header_line(line: bytes | bytearray, pos: int = 0) -> bool:
    """The line at `pos` starts a header field, as Postfix's is_header() says."""
    return _HEADER_LINE.match(line, pos) is not None


def scan_header(data: bytes | bytearray, start: int = 0) -> tuple[int | None, int]:
    """Where the header section of a message starting with `data` ends, as Postfix
    reads it: `(offset of the body, _)`, or `(None, resume)` when `data` ends before
    the section does; call again with more data and `start=resume`.

    The section ends at the empty line (which belongs to it), or just before the
    first line that neither is a header field (`is_header_line`) nor continues
    one (starts with a space or a tab): Postfix's cleanup delivers that line as
    body, after an empty line of its own (mime_state.c: "Invalid input. Force
    output of one blank line and jump to the body state"). Content whose first
    line starts with white space has no header section at all (`headerless`).
    A leading mbox "From " line is no header field either: Postfix's smtpd makes
    one an X-Mailbox-Line field only when it is the first line it receives, and
    what spamgate relays always starts with its own Authentication-Results.
    Lines are CRLF-terminated here (DATA refuses or normalises bare CR and LF),
    and no longer than Postfix's line_length_limit with the default limits.
    """
    if start == 0 and data[:1] in WHITE_SPACE:
        return 0, 0
    pos = start
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None, pos
        if eol == pos:
            return pos + 2, pos
        if data[pos] in (0x20, 0x09) or _HEADER_LINE.match(data, pos):
            pos = eol + 2
            continue
        return pos, pos


def normal_header(block: bytes) -> bytes:
    """A header section's fields as Postfix writes them out ("Name :" becomes
    "Name:", the rest of each field as it came), then one empty line."""
    out: list[bytes] = []
    for raw in _iter_raw_fields(block):
        m = _HEADER_LINE.match(raw)
        if m is not None:
            out += (m.group(1), b":", raw[m.end() :])
    out.append(b"\r\n")
    return b"".join(out)


def render_headers(headers: list[tuple[str, str]]) -> bytes:
    """Prepended header fields, CRLF-terminated; values may be folded (CRLF, then a
    space or a tab).

    Each value is made safe here, whatever made it, so that a field we add stays
    one field: a line break that is not a fold becomes one (a space is put before
    the next line), an empty or blank line (which would end the header section) is
    dropped, and other control characters become spaces.
    """
    return b"".join(
        f"{name}: {_one_field(value)}\r\n".encode("utf-8", "surrogateescape")
        for name, value in headers
    )


def _one_field(value: str) -> str:
    first, *rest = _LINE_BREAK.split(value)
    lines = [_CONTROL.sub(" ", first)]
    for line in rest:
        line = _CONTROL.sub(" ", line)
        if line.strip():
            lines.append(line if line[0] in " \t" else " " + line)
    return "\r\n".join(lines)
